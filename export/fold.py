"""Fold a FAIR network's item score into one ``[I, D]`` table + ``[I]`` bias (``FoldedScorer``).

The item score is ``query_vectors(h) @ item_vectors.T + bias`` (``FAIR.item_logits``), and
``query_vectors`` is linear in ``h`` (the per-level head projections and the ID query, no bias): it is
``h @ M`` for the ``[D, L*D (+ D)]`` matrix ``M = query_vectors(I_D)``. Hence

    score(i) = h . (item_vectors[i] @ M.T) + bias[i]

and ``item_vectors @ M.T`` is the folded table: per item, the level projections of its code
embeddings plus the ID query's transpose applied to its ID (+ text) vector. The code heads are
affine in ``h`` the same way (``head_logits(h) = h @ W + b``), which is what the beam needs. Reading
``M`` and ``W`` off the network by feeding it the identity keeps this file free of the network's
internals; the test checks the fold against ``item_logits`` (cold items and text included).
"""

from __future__ import annotations

import numpy as np
import torch

from model.fair import FAIR
from model.search.folded import CodeHeads, FoldedScorer

FOLD_CHUNK = 65_536  # items folded at a time: [chunk, L*D (+ D)] in float64 stays ~0.4 GB at D 128


@torch.no_grad()
def fold_item_scores(model: FAIR, codes: np.ndarray, chunk: int = FOLD_CHUNK) -> FoldedScorer:
    """The folded item score of ``model`` over the catalog whose codes are ``codes`` ``[I, L]``.

    Computed in float64 (the sums reorder the network's float32 arithmetic; float64 keeps the fold's
    own error far below float32's), stored as float32, ``chunk`` items at a time: the stacked item
    vectors of a whole 1M-item catalog would be ~6 GB in float64, the folded table is 0.5 GB.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    was_training = model.training
    model.eval()
    try:
        item_codes = torch.as_tensor(np.asarray(codes, dtype=np.int64))
        n, d = item_codes.shape[0], model.cfg.d_model
        eye = torch.eye(d)
        m = model.query_vectors(eye).double()  # [D, L*D (+ D)]: row d = the query of the basis state e_d
        table = np.empty((n, d), dtype=np.float32)
        bias = np.empty(n, dtype=np.float32)
        for start in range(0, n, chunk):
            part = slice(start, min(start + chunk, n))
            vectors, part_bias = model.item_vectors(item_codes[part], torch.arange(part.start, part.stop))
            table[part] = (vectors.double() @ m.T).numpy()  # [chunk, D]
            bias[part] = part_bias.float().numpy()
        zero = torch.zeros(1, d)
        head_bias = model.head_logits(zero)[0]  # [L, V]
        head_weight = model.head_logits(eye) - head_bias  # [D, L, V]
    finally:
        model.train(was_training)
    heads = CodeHeads(_f32(head_weight), _f32(head_bias))
    return FoldedScorer(np.asarray(codes, dtype=np.int64), table, bias, heads)


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)
