"""Leave-one-out ranking metrics (numpy only).

Protocol (TIGER/P5/S3-Rec): every user has exactly one relevant item, the held-out target, ranked
against the whole catalog. With one relevant item the ideal DCG is 1, so for a target at 0-based rank
``r``: Recall@k = HR@k = [r < k] and NDCG@k = [r < k] / log2(r + 2). Averages are over users.
Keeping this in one function means the trainer's validation, ``fair-eval`` and the popularity baseline
cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EMPTY = -1  # marks an empty slot in a ranked list (fewer than K items available)


def target_ranks(ranked_items: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each user's target in its ranked list, or ``K`` (past the end) when absent.

    ``ranked_items``: int ``[U, K]`` item indices, best first, ``-1`` for empty slots.
    ``targets``: int ``[U]`` item indices (>= 0). If a list repeats the target, the first hit counts.
    """
    ranked = np.asarray(ranked_items)
    tgt = np.asarray(targets)
    if ranked.ndim != 2:
        raise ValueError(f"ranked_items must be [U, K], got shape {ranked.shape}")
    if tgt.ndim != 1 or tgt.shape[0] != ranked.shape[0]:
        raise ValueError(f"targets must be [U={ranked.shape[0]}], got shape {tgt.shape}")
    if tgt.size and tgt.min() < 0:
        raise ValueError(f"targets must be item indices >= 0, found {int(tgt.min())}")
    hits = ranked == tgt[:, None]  # [U, K]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), ranked.shape[1]).astype(np.int64)


def recall_ndcg(
    ranked_items: np.ndarray, targets: np.ndarray, ks: Sequence[int] = (5, 10)
) -> dict[str, float]:
    """Recall@k and NDCG@k for every k in ``ks``: keys ``recall@{k}``, ``ndcg@{k}`` (in ``ks`` order).

    Raises ``ValueError`` for no users or a k longer than the lists: a @10 metric computed from 5
    returned items would silently understate the model, so that is an error, not a zero.
    """
    ranks = target_ranks(ranked_items, targets)
    num_users, list_len = np.asarray(ranked_items).shape
    if num_users == 0:
        raise ValueError("no users to evaluate")
    out: dict[str, float] = {}
    for k in ks:
        if not 1 <= k <= list_len:
            raise ValueError(f"k={k} needs ranked lists of at least k items, got {list_len}")
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    return out


def invalid_item_mask(
    ranked_items: np.ndarray,
    num_items: int,
    exclude: Sequence[np.ndarray | None] | None = None,
) -> np.ndarray:
    """bool ``[U, K]``: True for a returned slot that is not a recommendable catalog item.

    A slot is invalid when its index is outside ``[0, num_items)`` (a code path that is not an item),
    repeats an earlier item of the same list, or is in that user's ``exclude`` set (an already seen
    item when seen items are excluded). Empty slots (``-1``) are not returned items: never invalid.
    """
    ranked = np.asarray(ranked_items)
    if ranked.ndim != 2:
        raise ValueError(f"ranked_items must be [U, K], got shape {ranked.shape}")
    if exclude is not None and len(exclude) != ranked.shape[0]:
        raise ValueError(f"exclude has {len(exclude)} entries for {ranked.shape[0]} users")
    filled = ranked != EMPTY
    bad = (ranked < 0) | (ranked >= num_items)
    # repeats within a row: sort each row stably, a value equal to its left neighbour is a repeat
    order = np.argsort(ranked, axis=1, kind="stable")
    srt = np.take_along_axis(ranked, order, axis=1)
    dup_sorted = np.zeros(srt.shape, dtype=bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    dup = np.zeros_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    bad |= dup
    if exclude is not None:
        for u, ex in enumerate(exclude):
            if ex is not None and len(ex):
                bad[u] |= np.isin(ranked[u], np.asarray(ex))
    return bad & filled


def share_of_filled(bad: np.ndarray, ranked_items: np.ndarray) -> float:
    """``bad`` slots as a share of the filled (non-empty) slots; 0.0 when nothing was returned."""
    total = int((np.asarray(ranked_items) != EMPTY).sum())
    return float(np.asarray(bad).sum() / total) if total else 0.0


def invalid_item_rate(
    ranked_items: np.ndarray,
    num_items: int,
    exclude: Sequence[np.ndarray | None] | None = None,
) -> float:
    """Share of returned (non-empty) slots that are invalid (see ``invalid_item_mask``)."""
    return share_of_filled(invalid_item_mask(ranked_items, num_items, exclude), ranked_items)


def evaluation_report(
    ranked_items: np.ndarray,
    targets: np.ndarray,
    num_items: int,
    exclude: Sequence[np.ndarray | None] | None = None,
    ks: Sequence[int] = (5, 10),
) -> dict[str, float | int]:
    """Everything ``fair-eval`` reports for one ranking: Recall/NDCG@ks, ``invalid_rate``, ``users``.

    The model and the popularity baseline both go through here, so their numbers are comparable.
    """
    report: dict[str, float | int] = dict(recall_ndcg(ranked_items, targets, ks))
    report["invalid_rate"] = invalid_item_rate(ranked_items, num_items, exclude)
    report["users"] = int(np.asarray(targets).shape[0])
    return report
