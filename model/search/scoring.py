"""Item scores from the network's outputs, and the two searches the service and fair-eval rank with.

numpy only (the service imports it). The network gives, per user, ``code_scores`` ``[L, V]`` (one score
per code of each level) and ``query`` ``[D]``. Item ``i`` scores

    score(i) = sum_l code_scores[l, code_l(i)] + query . vectors[i] + bias[i]

(``vectors``/``bias``: the item-ID part, absent for models without item IDs, zero for items that had no
trained ID embedding, except for a text model's projected text part, which every item has). This is exactly the logit the item softmax of training optimises
(``FAIR.item_logits``), so what is served is what was trained.

Two searches, chosen per catalog size (docs/model.md has the measurements):

* ``exact``: score every item (L gathers + one ``[B, D] x [D, I]`` product per batch), drop the
  excluded ones, take the top k. The reference, and the served search up to ~10^5 items.
* ``beam``: the constrained beam over semantic-ID prefixes (``model.search.beam``) on the code part
  proposes ``candidates`` items per user, which are then rescored with the full score. The beam never
  sees the ID part, so it needs width; use it where scoring the whole catalog costs too much.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from model.search.beam import ExcludeArg, SearchResult, constrained_beam_search, excluded_pairs
from model.semantic_ids.trie import CodeTrie

SEARCH_MODES = ("exact", "beam")


@dataclass(frozen=True)
class ItemScorer:
    """The catalog side of the item score: codes ``[I, L]`` and, for item-ID models, ``vectors``
    ``[I, D]`` float32 and ``bias`` ``[I]`` float32."""

    codes: np.ndarray
    vectors: np.ndarray | None = None
    bias: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.codes.ndim != 2:
            raise ValueError(f"codes must be [items, L], got shape {self.codes.shape}")
        if (self.vectors is None) != (self.bias is None):
            raise ValueError("item vectors and bias come together (both or neither)")
        if self.vectors is not None:
            n = self.codes.shape[0]
            if self.vectors.ndim != 2 or self.vectors.shape[0] != n or self.bias.shape != (n,):
                raise ValueError(
                    f"item vectors {self.vectors.shape} / bias {self.bias.shape} do not match {n} items"
                )

    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0])

    @cached_property
    def _codes_by_level(self) -> np.ndarray:
        """``[L, I]`` int64, each level's codes contiguous (the gathers of ``all_scores`` read them)."""
        return np.ascontiguousarray(self.codes.T, dtype=np.int64)

    @cached_property
    def _vectors_t(self) -> np.ndarray:
        """``[D, I]`` contiguous copy of the item vectors, made on the first exact scoring: the
        ``[B, D] x [D, I]`` product runs up to 2x faster on it than on the transposed view (batch 16,
        12k items; bench/bench_exact_kernels.py, docs/benchmarks.md). It doubles the vector table's
        memory, so the beam (large catalogs), which only gathers rows, never builds it."""
        return np.ascontiguousarray(self.vectors.T)

    def _check(self, code_scores: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cs = np.asarray(code_scores, dtype=np.float32)
        q = np.asarray(query, dtype=np.float32)
        L = self.codes.shape[1]
        if cs.ndim != 3 or cs.shape[1] != L:
            raise ValueError(f"code_scores must be [B, L={L}, V], got shape {cs.shape}")
        if q.ndim != 2 or q.shape[0] != cs.shape[0]:
            raise ValueError(f"query must be [B={cs.shape[0]}, D], got shape {q.shape}")
        if self.vectors is not None and q.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"query width {q.shape[1]} != item vector width {self.vectors.shape[1]}")
        if np.isnan(cs).any() or np.isnan(q).any():
            raise ValueError("code_scores or query contain NaN")
        return cs, q

    def all_scores(self, code_scores: np.ndarray, query: np.ndarray) -> np.ndarray:
        """``[B, I]`` float32 scores of every catalog item."""
        cs, q = self._check(code_scores, query)
        L, V = cs.shape[1], cs.shape[2]
        flat = cs.reshape(cs.shape[0], L * V)
        by_level = self._codes_by_level
        scores = np.take(flat, by_level[0], axis=1)
        for level in range(1, L):
            scores += np.take(flat, by_level[level] + level * V, axis=1)
        if self.vectors is not None:
            scores += q @ self._vectors_t
            scores += self.bias
        return scores

    def scores_of(self, code_scores: np.ndarray, query: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``[B, C]`` float32 scores of the items ``items`` ``[B, C]`` (-1 = none: scored -inf)."""
        cs, q = self._check(code_scores, query)
        items = np.asarray(items, dtype=np.int64)
        L, V = cs.shape[1], cs.shape[2]
        safe = np.maximum(items, 0)
        codes = self.codes[safe]  # [B,C,L]
        rows = np.arange(cs.shape[0])[:, None, None]
        scores = cs.reshape(cs.shape[0], L * V)[rows, codes + np.arange(L) * V].sum(-1)  # [B,C]
        if self.vectors is not None:
            scores += np.einsum("bd,bcd->bc", q, self.vectors[safe]) + self.bias[safe]
        return np.where(items >= 0, scores, -np.inf).astype(np.float32)


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


def exact_search(
    scorer: ItemScorer, code_scores: np.ndarray, query: np.ndarray, k: int, exclude: ExcludeArg = None
) -> SearchResult:
    """Top-k by the full score over the whole catalog, excluded items removed."""
    scores = scorer.all_scores(code_scores, query)
    rows, cols = excluded_pairs(exclude, scores.shape[0], scorer.num_items)
    scores[rows, cols] = -np.inf
    return top_k(scores, k)


def beam_search(
    scorer: ItemScorer,
    trie: CodeTrie,
    code_scores: np.ndarray,
    query: np.ndarray,
    k: int,
    candidates: int,
    exclude: ExcludeArg = None,
) -> SearchResult:
    """The constrained beam over the code part proposes ``candidates`` items (beam width =
    ``candidates``), which are rescored with the full score; top-k of those."""
    if candidates < k:
        raise ValueError(f"candidates ({candidates}) must be >= k ({k})")
    cs, q = scorer._check(code_scores, query)
    proposed = constrained_beam_search(cs, trie, beam_size=candidates, k=candidates, exclude=exclude)
    return _rescored(scorer, cs, q, proposed.items, k)


def _rescored(scorer: ItemScorer, cs: np.ndarray, q: np.ndarray, items: np.ndarray, k: int) -> SearchResult:
    scores = scorer.scores_of(cs, q, items)
    best = top_k(scores, k)
    picked = np.where(best.items >= 0, np.take_along_axis(items, np.maximum(best.items, 0), axis=1), -1)
    return SearchResult(items=picked, scores=best.scores)


def search(
    scorer: ItemScorer,
    trie: CodeTrie,
    code_scores: np.ndarray,
    query: np.ndarray,
    k: int,
    mode: str = "exact",
    candidates: int = 200,
    exclude: Sequence[np.ndarray | None] | None = None,
) -> SearchResult:
    """The one entry point of fair-eval, export checks and the service: ``mode`` is ``exact`` or
    ``beam`` (beam over prefixes for ``candidates`` items, then exact rescoring)."""
    if mode == "exact":
        return exact_search(scorer, code_scores, query, k, exclude)
    if mode == "beam":
        return beam_search(scorer, trie, code_scores, query, k, candidates, exclude)
    raise ValueError(f"search mode must be one of {SEARCH_MODES}, got {mode!r}")
