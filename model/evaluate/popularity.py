"""The popularity baseline (numpy only): recommend the most interacted-with training items.

It is the floor every learned model has to clear, and the fallback the service uses for users
without a history, so it is ranked exactly like a model: the same ``k``, the same exclusion of seen
items, the same metric code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model.evaluate.metrics import EMPTY


def popularity_order(counts: np.ndarray) -> np.ndarray:
    """Item indices, most popular first; ties broken by lower item index so the order is deterministic."""
    counts = np.asarray(counts)
    if counts.ndim != 1:
        raise ValueError(f"counts must be [num_items], got shape {counts.shape}")
    return np.argsort(-counts, kind="stable").astype(np.int64)


def rank_by_popularity(
    order: np.ndarray, histories: Sequence[np.ndarray], k: int = 10, exclude_seen: bool = True
) -> np.ndarray:
    """Top-``k`` items per user from a popularity ``order``, skipping that user's history when ``exclude_seen``.

    Returns int64 ``[U, k]``, ``-1`` where the catalog has fewer than ``k`` unseen items.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    order = np.asarray(order, dtype=np.int64)
    out = np.full((len(histories), k), EMPTY, dtype=np.int64)
    # a user can knock out at most len(history) of the top items, so only that many candidates matter
    longest = max((len(h) for h in histories), default=0) if exclude_seen else 0
    candidates = order[: k + longest]
    for u, hist in enumerate(histories):
        picked = candidates[~np.isin(candidates, hist)] if exclude_seen and len(hist) else candidates
        picked = picked[:k]
        out[u, : len(picked)] = picked
    return out
