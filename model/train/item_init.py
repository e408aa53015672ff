"""Where the item-ID table starts: random (the default) or the items' text embeddings.

The ID table is the one embedding with a row per item, and most rows are trained on a handful of
interactions: a random start leaves a rare item's row mostly noise at the end of training. Starting
every row from its item's text embedding (the MiniLM vector the semantic IDs are quantized from,
reduced to ``d_model`` dimensions by PCA) gives rare items a row that already places them near items
with similar text; training then moves the rows of frequent items where their interactions say.
Only the start changes: the exported model, the bundle and the served score are the same as with a
random start.
"""

from __future__ import annotations

import numpy as np
import torch

ITEM_ID_INITS = ("random", "text")


def text_init(embeddings: np.ndarray, dim: int, std: float = 0.02) -> torch.Tensor:
    """``[items, E]`` text embeddings -> ``[items, dim]`` float32 rows: the top ``dim`` principal
    components (centred), scaled to an overall standard deviation ``std`` (that of the random init,
    so the optimiser sees rows of the size it would otherwise start from).

    When ``dim`` exceeds the rank of the centred embeddings, the missing columns are 0.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"text embeddings must be [items >= 2, dim], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("text embeddings contain NaN or inf")
    x = x - x.mean(0, keepdims=True)
    # principal directions from the [E, E] covariance (an SVD of x would build another [items, E])
    eigval, eigvec = np.linalg.eigh(x.T @ x)  # ascending
    order = np.argsort(eigval)[::-1]
    rank = int((eigval > eigval.max() * 1e-10).sum()) if eigval.max() > 0 else 0
    k = min(dim, rank)
    proj = x @ eigvec[:, order[:k]]  # [items, k]
    out = np.zeros((x.shape[0], dim), dtype=np.float64)
    out[:, :k] = proj
    scale = out.std()
    if scale > 0:
        out *= std / scale
    return torch.from_numpy(out.astype(np.float32))
