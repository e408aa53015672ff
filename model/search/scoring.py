"""Item scoring kernels and the one search entry point of fair-eval, export checks and the service.

numpy only (the service imports it). What an item scores is ``model.search.item_scores.ItemScorer``;
here are the kernels every search mode ranks with — ``top_k`` (fast, parity-tested against
``top_k_reference``) and ``exact_search`` (the whole catalog scored) — and ``search``, which hands a
call to the registered mode of that name (``model.search.modes``: ``exact``, ``beam``; docs/model.md
has the measurements). This module imports no mode: the modes import it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model.search.item_scores import ItemScorer
from model.search.modes.registry import SEARCH_MODES, make_mode
from model.search.results import ExcludeArg, SearchResult, excluded_pairs
from model.semantic_ids.trie import CodeTrie

__all__ = ["SEARCH_MODES", "ItemScorer", "exact_search", "search", "top_k", "top_k_reference", "top_k_unseen"]


TOP_K_BLOCK = 128  # columns per block of the fast top-k


def top_k(scores: np.ndarray, k: int) -> SearchResult:
    """Best ``k`` of each row of ``scores`` ``[B, C]`` (``-inf`` and NaN = not a candidate), best first;
    equal scores inside the k returned go lower column first (which of several items tied at the k-th
    score is kept is not defined). Padded with -1 / -inf when a row has fewer than k finite scores.

    The fast form of ``top_k_reference`` (parity-tested): the row's best k items lie in the k blocks of
    ``TOP_K_BLOCK`` columns with the highest maxima, so one vectorised max per block and a selection
    among k * TOP_K_BLOCK candidates replace a selection over the whole row (12k-item catalog, batch
    16: ~4x faster)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    batch, width = scores.shape
    blocks = -(-width // TOP_K_BLOCK)
    if blocks <= 2 * k:  # too few blocks for the pre-selection to pay
        return top_k_reference(scores, k)
    padded = scores
    if blocks * TOP_K_BLOCK != width:
        padded = np.full((batch, blocks * TOP_K_BLOCK), -np.inf, dtype=scores.dtype)
        padded[:, :width] = scores
    block_max = np.fmax.reduce(padded.reshape(batch, blocks, TOP_K_BLOCK), axis=2)  # NaN ignored
    block_max[np.isnan(block_max)] = -np.inf  # an all-NaN block holds no candidate
    best_blocks = np.sort(np.argpartition(block_max, blocks - k, axis=1)[:, blocks - k :], axis=1)
    # ascending blocks keep the candidates in column order, so ties still go to the lower column
    cols = (best_blocks[:, :, None] * TOP_K_BLOCK + np.arange(TOP_K_BLOCK)).reshape(batch, k * TOP_K_BLOCK)
    best = top_k_reference(np.take_along_axis(padded, cols, axis=1), k)
    picked = np.take_along_axis(cols, np.maximum(best.items, 0), axis=1)
    return SearchResult(items=np.where(best.items >= 0, picked, -1), scores=best.scores)


def top_k_reference(scores: np.ndarray, k: int) -> SearchResult:
    """The reference form of ``top_k``: one selection over each whole row."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    batch, width = scores.shape
    kk = min(k, width)
    if kk < width:
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    else:
        part = np.broadcast_to(np.arange(width), (batch, width))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    best = np.take_along_axis(part_scores, order, axis=1)
    items = np.full((batch, k), -1, dtype=np.int64)
    out = np.full((batch, k), -np.inf, dtype=np.float32)
    real = np.isfinite(best)
    items[:, :kk] = np.where(real, idx, -1)
    out[:, :kk] = np.where(real, best, -np.inf)
    return SearchResult(items=items, scores=out)


def top_k_unseen(scores: np.ndarray, k: int, exclude: ExcludeArg = None) -> SearchResult:
    """Top-k of every row of ``scores`` ``[B, I]`` (whole-catalog scores; written in place) after the
    excluded items are set to -inf: the exact search once the catalog is scored."""
    rows, cols = excluded_pairs(exclude, scores.shape[0], scores.shape[1])
    scores[rows, cols] = -np.inf
    return top_k(scores, k)


def exact_search(
    scorer: ItemScorer, code_scores: np.ndarray, query: np.ndarray, k: int, exclude: ExcludeArg = None
) -> SearchResult:
    """Top-k by the full score over the whole catalog, excluded items removed."""
    return top_k_unseen(scorer.all_scores(code_scores, query), k, exclude)


def search(
    scorer: ItemScorer,
    trie: CodeTrie,
    code_scores: np.ndarray,
    query: np.ndarray,
    k: int,
    mode: str = "exact",
    candidates: int = 200,
    exclude: Sequence[np.ndarray | None] | None = None,
    **params: int,
) -> SearchResult:
    """Rank with the registered search mode ``mode``, configured from ``candidates`` (the beam's
    width) and any other mode parameter passed by name, from the network outputs ``(code_scores,
    query)``; callers holding a configured mode (or a ``FoldedScorer``) call its ``search`` directly."""
    configured = make_mode(mode, {"candidates": candidates, **params})
    return configured.search(scorer, trie, (code_scores, query), k, exclude)
