"""Constrained beam search and exact top-k over a ``CodeTrie`` (numpy only: the service imports it).

The FAIR model predicts every code of the next item at once: ``log_probs[b, l, v]`` is the log-prob
of code ``v`` at position ``l`` for user ``b``. An item's score is the sum over levels of the log-probs
of its codes. Both searches work on flat ragged arrays of (user, node, score) so that a whole batch
of users and beams is expanded with a handful of numpy calls per level; the only Python loop is over
the ``L`` levels.

Beam width and exclusion. Each level keeps the best ``max(beam_size, k)`` prefixes per user, and a
prefix all of whose items the user excluded (already seen) does not count as a valid prefix: it is
dropped before ranking. Every kept prefix therefore still holds an item the user may get, so the
last level, which ranks *all* children of the surviving prefixes after dropping excluded items,
returns ``k`` items whenever the catalog holds ``k`` non-excluded ones — however many items are
excluded and however narrow the beam, at no extra width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.semantic_ids.trie import CodeTrie

ExcludeArg = Sequence[np.ndarray | Sequence[int] | None] | None


@dataclass(frozen=True)
class SearchResult:
    """Top-k per user, best first: ``items`` int64 ``[B, k]`` (-1 = padding), ``scores`` float32 (-inf)."""

    items: np.ndarray
    scores: np.ndarray


# ---- shared pieces ------------------------------------------------------------------------------------
def _check_log_probs(log_probs: np.ndarray, trie: CodeTrie) -> np.ndarray:
    lp = np.asarray(log_probs)
    if lp.ndim != 3 or lp.shape[1] != trie.code_length or lp.shape[2] != trie.codebook_size:
        raise ValueError(
            f"log_probs must be [B, L={trie.code_length}, V={trie.codebook_size}] to match the trie, "
            f"got shape {lp.shape}"
        )
    if np.isnan(lp).any():
        raise ValueError("log_probs contain NaN")
    # float64 sums: scores of the same item agree bit-for-bit between beam, exact and brute force.
    return lp.astype(np.float64, copy=False)


@dataclass(frozen=True)
class _Excluded:
    """Distinct (user, item) pairs to drop: users, the items' leaf edges, sorted keys user * N + item."""

    users: np.ndarray
    leaves: np.ndarray
    keys: np.ndarray


def _exclusion(exclude: ExcludeArg, batch: int, trie: CodeTrie) -> _Excluded:
    num_items = trie.num_items
    if exclude is None:
        empty = np.zeros(0, dtype=np.int64)
        return _Excluded(empty, empty, empty)
    if len(exclude) != batch:
        raise ValueError(f"exclude must have one entry per user ({batch}), got {len(exclude)}")
    keys = []
    for user, items in enumerate(exclude):  # O(B) bookkeeping, outside the per-level hot path
        if items is None:
            continue
        items = np.unique(np.asarray(items, dtype=np.int64).reshape(-1))
        if items.size and (items[0] < 0 or items[-1] >= num_items):
            raise ValueError(f"exclude[{user}] holds item indices outside the catalog [0, {num_items})")
        keys.append(user * num_items + items)
    keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)  # sorted: users ascending
    users, items = np.divmod(keys, max(num_items, 1))
    leaves = trie.leaf_of_item()[items] if keys.size else keys
    return _Excluded(users, leaves, keys)


def _fully_excluded(trie: CodeTrie, level: int, users: np.ndarray, nodes: np.ndarray, excl: _Excluded):
    """Mask of candidate (user, node at ``level``) pairs whose every item that user excluded."""
    n_nodes = trie.num_nodes(level)
    anc = trie.ancestors(level)[excl.leaves].astype(np.int64)
    keys, counts = np.unique(excl.users * n_nodes + anc, return_counts=True)
    full = keys[counts == trie.leaf_counts(level)[keys % n_nodes]]
    if full.size == 0:
        return np.zeros(users.shape, dtype=bool)
    query = users * n_nodes + nodes
    pos = np.minimum(np.searchsorted(full, query), full.size - 1)
    return full[pos] == query


def _expand(
    trie: CodeTrie, level: int, lp: np.ndarray, users: np.ndarray, nodes: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All children of the flat frontier ``(users, nodes, scores)`` at ``level``.

    Returns flat ``(users, edges, scores)``: the edge id is the child's node id at ``level + 1`` (the
    leaf position at the last level: ``trie.items[edge]`` is the item). Users stay non-decreasing when
    they were.
    """
    ptr = trie.indptr[level]
    start = ptr[nodes].astype(np.int64)
    count = ptr[nodes + 1] - start
    parent = np.repeat(np.arange(len(nodes)), count)
    # ragged arange: edge = start of its parent + its rank among that parent's children
    first = np.cumsum(count) - count
    edges = start[parent] + (np.arange(len(parent)) - first[parent])
    child_users = users[parent]
    child_scores = scores[parent] + lp[child_users, level, trie.child_codes[level][edges]]
    return child_users, edges, child_scores


def _top_per_user(
    users: np.ndarray, values: np.ndarray, scores: np.ndarray, batch: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``width`` candidates per user from flat arrays (``users`` non-decreasing): ``[B, width]``.

    Candidates are scattered into a ``[B, most candidates of any user]`` matrix of NEGATED scores with
    NaN for empty slots: argpartition/argsort put NaN after everything, even after a real candidate
    scored -inf, so padding never displaces a real candidate. Ties are broken by the lower value.
    """
    out_values = np.full((batch, width), -1, dtype=np.int64)
    out_scores = np.full((batch, width), -np.inf, dtype=np.float64)
    if users.size == 0 or width == 0:
        return out_values, out_scores
    per_user = np.bincount(users, minlength=batch)
    cols = np.arange(users.size) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    span = int(per_user.max())
    key = np.full((batch, span), np.nan)
    key[users, cols] = -scores
    val = np.full((batch, span), np.iinfo(np.int64).max, dtype=np.int64)
    val[users, cols] = values

    keep = min(width, span)
    if keep < span:
        idx = np.argpartition(key, keep - 1, axis=1)[:, :keep]
        k_sub, v_sub = np.take_along_axis(key, idx, 1), np.take_along_axis(val, idx, 1)
    else:
        k_sub, v_sub = key, val
    order = np.lexsort((v_sub, k_sub), axis=1)  # primary: score (NaN last), secondary: value
    k_sub, v_sub = np.take_along_axis(k_sub, order, 1), np.take_along_axis(v_sub, order, 1)
    real = ~np.isnan(k_sub)
    out_values[:, :keep] = np.where(real, v_sub, -1)
    out_scores[:, :keep] = np.where(real, -k_sub, -np.inf)
    return out_values, out_scores


def _flatten(nodes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[B, W]`` padded beams (node -1 = empty) -> flat (users, nodes, scores), users non-decreasing."""
    users, cols = np.nonzero(nodes >= 0)
    return users, nodes[users, cols], scores[users, cols]


def _drop_excluded(trie: CodeTrie, users, edges, scores, excl: _Excluded):
    """Leaf edges -> item indices, without the (user, item) pairs in ``excl``."""
    items = trie.items[edges]
    if excl.keys.size:
        query = users * trie.num_items + items
        pos = np.minimum(np.searchsorted(excl.keys, query), excl.keys.size - 1)
        keep = excl.keys[pos] != query
        users, items, scores = users[keep], items[keep], scores[keep]
    return users, items, scores


def _beam(lp: np.ndarray, trie: CodeTrie, beam_size: int, k: int, excl: _Excluded):
    """Beam search in float64; returns ``([B, k] items, [B, k] float64 scores)``."""
    batch = lp.shape[0]
    width = max(beam_size, k)  # fewer than k prefixes could not be guaranteed to hold k items
    users = np.arange(batch)
    nodes = np.zeros(batch, dtype=np.int64)
    scores = np.zeros(batch, dtype=np.float64)
    for level in range(trie.code_length - 1):
        users, edges, cand = _expand(trie, level, lp, users, nodes, scores)
        if excl.keys.size:  # a prefix with nothing left to recommend must not take a beam slot
            keep = ~_fully_excluded(trie, level + 1, users, edges, excl)
            users, edges, cand = users[keep], edges[keep], cand[keep]
        beam_nodes, beam_scores = _top_per_user(users, edges, cand, batch, width)
        users, nodes, scores = _flatten(beam_nodes, beam_scores)
    users, edges, cand = _expand(trie, trie.code_length - 1, lp, users, nodes, scores)
    users, items, cand = _drop_excluded(trie, users, edges, cand, excl)
    return _top_per_user(users, items, cand, batch, k)


def _result(items: np.ndarray, scores: np.ndarray) -> SearchResult:
    return SearchResult(items=items.astype(np.int64), scores=scores.astype(np.float32))


def _check_sizes(k: int, beam_size: int | None = None) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if beam_size is not None and beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")


# ---- public API ---------------------------------------------------------------------------------------
def constrained_beam_search(
    log_probs: np.ndarray, trie: CodeTrie, beam_size: int, k: int, exclude: ExcludeArg = None
) -> SearchResult:
    """Top-k valid items per user by level-wise beam search over the trie (see module docstring).

    ``log_probs`` float ``[B, L, V]``; ``exclude`` one int array of item indices (or None) per user.
    Never returns an invalid, excluded or duplicate item; pads with -1 / -inf when fewer than k exist.
    """
    _check_sizes(k, beam_size)
    lp = _check_log_probs(log_probs, trie)
    excl = _exclusion(exclude, lp.shape[0], trie)
    return _result(*_beam(lp, trie, beam_size, k, excl))


def exact_topk(log_probs: np.ndarray, trie: CodeTrie, k: int, exclude: ExcludeArg = None) -> SearchResult:
    """Exact top-k valid items per user: branch and bound over the trie.

    A prefix's score plus the best log-prob of every remaining level bounds every item under it. A
    beam search (width 4k) gives, per user, k real items: its k-th score ``tau`` is a lower bound of the
    true k-th best score, so any prefix whose upper bound is below ``tau`` holds no top-k item. We
    expand, level by level and for the whole batch at once, only the prefixes whose bound reaches
    ``tau`` — best-first in effect, but vectorised — then rank the surviving leaves exactly.
    Memory grows with the surviving prefixes: small for peaked distributions, the catalog per user
    for flat ones (it is the reference, not the serving path).
    """
    _check_sizes(k)
    lp = _check_log_probs(log_probs, trie)
    batch, length = lp.shape[0], trie.code_length
    excl = _exclusion(exclude, batch, trie)
    if batch == 0:
        return _result(np.zeros((0, k), np.int64), np.zeros((0, k)))
    # A 4k-wide beam costs little more than a k-wide one and its tighter bound prunes far more
    # (1M items, 64 users: 1.85 s -> 0.47 s per batch on the dev box).
    _, lower = _beam(lp, trie, 4 * k, k, excl)
    tau = lower[:, k - 1]  # -inf when fewer than k items exist: then everything is expanded
    # rest[b, l] = sum of max log-probs of levels l+1..L-1: the most a prefix ending at l can still gain
    level_max = lp.max(axis=2)
    rest = np.concatenate([np.cumsum(level_max[:, ::-1], axis=1)[:, ::-1][:, 1:], np.zeros((batch, 1))], 1)
    # float64 sums in another order may differ in the last ulp: keep a tiny slack so the bound stays safe
    slack = 1e-9 * (1.0 + np.abs(np.where(np.isfinite(tau), tau, 0.0)))

    users = np.arange(batch)
    nodes = np.zeros(batch, dtype=np.int64)
    scores = np.zeros(batch, dtype=np.float64)
    for level in range(length):
        users, edges, scores = _expand(trie, level, lp, users, nodes, scores)
        alive = scores + rest[users, level] >= tau[users] - slack[users]
        users, nodes, scores = users[alive], edges[alive], scores[alive]
    users, items, scores = _drop_excluded(trie, users, nodes, scores, excl)
    return _result(*_top_per_user(users, items, scores, batch, k))
