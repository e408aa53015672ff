"""The item score folded into one table: ``score(i) = h . table[i] + bias[i]`` (numpy only: the service).

FAIR's item score is affine in the final boundary state ``h`` ``[D]``: the code heads are linear maps of
``h`` dotted with the code embeddings plus a per-code bias, and the ID part is a linear query of ``h``
dotted with the item's ID (+ text) vector plus its bias. Summing each item's terms once, offline
(``export.fold``), gives one ``[I, D]`` table and one ``[I]`` bias:

    table[i] = sum_l head_proj[l] @ E_l[code_l(i)]  +  id_query^T vector[i]
    bias[i]  = sum_l head_bias[l, code_l(i)]        +  item_bias[i]

so exact search is one ``[B, D] x [D, I]`` product, no per-level gathers. Cold items (no trained ID
row) keep their code part (and text part), exactly as in ``ItemScorer``. The beam, which ranks code
prefixes, still needs per-level code scores: ``CodeHeads`` computes them from ``h`` with one product.

Same interface as ``ItemScorer`` (``check_outputs``, ``all_scores``, ``scores_of``, ``code_part``)
over the network outputs ``(history,)`` instead of ``(code_scores, query)``, so every search mode
ranks with either.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class CodeHeads:
    """The code heads as one affine map of ``h``: ``weight`` ``[D, L, V]``, ``bias`` ``[L, V]`` float32;
    ``code_scores(h) = h @ weight + bias`` ``[B, L, V]`` (what the exported graph used to output)."""

    weight: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        if self.weight.ndim != 3 or self.bias.shape != self.weight.shape[1:]:
            raise ValueError(
                f"code heads weight {self.weight.shape} / bias {self.bias.shape}: need [D, L, V] / [L, V]"
            )

    @cached_property
    def _flat(self) -> np.ndarray:
        return np.ascontiguousarray(self.weight.reshape(self.weight.shape[0], -1), dtype=np.float32)

    def code_scores(self, h: np.ndarray) -> np.ndarray:
        """``[B, L, V]`` float32 per-level code scores of the states ``h`` ``[B, D]``."""
        return (h @ self._flat).reshape(h.shape[0], *self.bias.shape) + self.bias


@dataclass(frozen=True)
class FoldedScorer:
    """The catalog side of the folded item score: codes ``[I, L]`` (the trie's), ``table`` ``[I, D]`` and
    ``bias`` ``[I]`` float32, and the ``heads`` the beam's code part needs."""

    codes: np.ndarray
    table: np.ndarray
    bias: np.ndarray
    heads: CodeHeads

    output_names: ClassVar[tuple[str, ...]] = ("history",)  # the network outputs this scorer reads

    def __post_init__(self) -> None:
        n = self.codes.shape[0]
        if (
            self.codes.ndim != 2
            or self.table.ndim != 2
            or self.table.shape[0] != n
            or self.bias.shape != (n,)
        ):
            raise ValueError(
                f"folded table {self.table.shape} / bias {self.bias.shape} do not match codes {self.codes.shape}"
            )
        if (
            self.heads.weight.shape[0] != self.table.shape[1]
            or self.heads.bias.shape[0] != self.codes.shape[1]
        ):
            raise ValueError(
                f"code heads {self.heads.weight.shape} do not fit width {self.table.shape[1]} and "
                f"{self.codes.shape[1]} levels"
            )

    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0])

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    @cached_property
    def _table_t(self) -> np.ndarray:
        """``[D, I]`` contiguous: the ``[B, D] x [D, I]`` product runs faster on it than on the
        transposed view (as ``ItemScorer._vectors_t``); built on the first exact scoring only."""
        return np.ascontiguousarray(self.table.T, dtype=np.float32)

    def check_outputs(self, history: np.ndarray) -> tuple[np.ndarray]:
        """The network's ``history`` ``[B, D]`` as float32, checked (width, no NaN)."""
        h = np.asarray(history, dtype=np.float32)
        if h.ndim != 2 or h.shape[1] != self.dim:
            raise ValueError(f"history must be [B, D={self.dim}], got shape {h.shape}")
        if np.isnan(h).any():
            raise ValueError("history contains NaN")
        return (h,)

    def all_scores(self, history: np.ndarray) -> np.ndarray:
        """``[B, I]`` float32 scores of every catalog item: one product and the bias."""
        (h,) = self.check_outputs(history)
        scores = h @ self._table_t
        scores += self.bias
        return scores

    def scores_of(self, history: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``[B, C]`` float32 scores of the items ``items`` ``[B, C]`` (-1 = none: scored -inf)."""
        (h,) = self.check_outputs(history)
        items = np.asarray(items, dtype=np.int64)
        safe = np.maximum(items, 0)
        scores = np.einsum("bd,bcd->bc", h, self.table[safe]) + self.bias[safe]
        return np.where(items >= 0, scores, -np.inf).astype(np.float32)

    def code_part(self, history: np.ndarray) -> np.ndarray:
        """``[B, L, V]`` float32 per-level code scores (the beam ranks prefixes by them)."""
        (h,) = self.check_outputs(history)
        return self.heads.code_scores(h)
