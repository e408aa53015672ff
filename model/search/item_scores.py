"""The catalog side of the item score: what every search scores items with (numpy only: the service imports it).

The network gives, per user, ``code_scores`` ``[L, V]`` (one score per code of each level) and
``query`` ``[D]``. Item ``i`` scores

    score(i) = sum_l code_scores[l, code_l(i)] + query . vectors[i] + bias[i]

(``vectors``/``bias``: the item-ID part, absent for models without item IDs, zero for items that had no
trained ID embedding, except for a text model's projected text part, which every item has). This is
exactly the logit the item softmax of training optimises (``FAIR.item_logits``), so what is served is
what was trained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Protocol

import numpy as np


class Scorer(Protocol):
    """What a search mode scores with: ``ItemScorer`` (outputs ``code_scores, query``) or
    ``model.search.folded.FoldedScorer`` (output ``history``). Every method takes the network outputs
    first, in ``output_names`` order (``scores_of`` then the items)."""

    output_names: ClassVar[tuple[str, ...]]

    @property
    def num_items(self) -> int: ...

    # Callables of any arity: each scorer takes its own outputs by name (a ``*outputs`` method here
    # would make a type checker reject every fixed-arity implementation).
    @property
    def check_outputs(self) -> Callable[..., tuple[np.ndarray, ...]]: ...

    @property
    def all_scores(self) -> Callable[..., np.ndarray]: ...  # -> [B, I] scores

    @property
    def scores_of(self) -> Callable[..., np.ndarray]: ...  # (outputs..., items [B, C]) -> [B, C]

    @property
    def code_part(self) -> Callable[..., np.ndarray]: ...  # -> per-level code scores for the beam


@dataclass(frozen=True)
class ItemScorer:
    """The catalog side of the item score: codes ``[I, L]`` and, for item-ID models, ``vectors``
    ``[I, D]`` float32 and ``bias`` ``[I]`` float32."""

    codes: np.ndarray
    vectors: np.ndarray | None = None
    bias: np.ndarray | None = None

    output_names: ClassVar[tuple[str, ...]] = ("code_scores", "query")  # the network outputs it reads

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

    def check_outputs(self, code_scores: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The network's outputs as float32, checked against this catalog (shapes, widths, no NaN)."""
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
        cs, q = self.check_outputs(code_scores, query)
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
        cs, q = self.check_outputs(code_scores, query)
        items = np.asarray(items, dtype=np.int64)
        L, V = cs.shape[1], cs.shape[2]
        safe = np.maximum(items, 0)
        codes = self.codes[safe]  # [B,C,L]
        rows = np.arange(cs.shape[0])[:, None, None]
        scores = cs.reshape(cs.shape[0], L * V)[rows, codes + np.arange(L) * V].sum(-1)  # [B,C]
        if self.vectors is not None:
            scores += np.einsum("bd,bcd->bc", q, self.vectors[safe]) + self.bias[safe]
        return np.where(items >= 0, scores, -np.inf).astype(np.float32)

    def code_part(self, code_scores: np.ndarray, query: np.ndarray) -> np.ndarray:
        """``[B, L, V]`` float32 per-level code scores (the beam ranks prefixes by them)."""
        return self.check_outputs(code_scores, query)[0]
