"""``exact``: score every catalog item, drop the excluded ones, take the top k.

``scorer.all_scores`` (L gathers plus one ``[B, D] x [D, I]`` product per batch for an ``ItemScorer``,
the product alone for a ``FoldedScorer``), then ``model.search.scoring.top_k_unseen``. The
reference, and the served search up to ``EXACT_MAX_ITEMS`` items: there it is both the most accurate
and cheaper per user than any beam wide enough to matter (docs/model.md, "The served search").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from model.search.item_scores import Scorer
from model.search.modes.base import SearchMode
from model.search.results import ExcludeArg, SearchResult
from model.search.scoring import top_k_unseen
from model.semantic_ids.trie import CodeTrie

# Up to this many items --search auto serves exact; above, the cost (~0.1 us per item and user) meets
# that of a 200-wide beam (docs/model.md, "The served search", has the measurements).
EXACT_MAX_ITEMS = 100_000


@dataclass(frozen=True)
class ExactMode(SearchMode):
    """Score the whole catalog; no parameters."""

    name: ClassVar[str] = "exact"
    help: ClassVar[str] = "score every catalog item"
    auto_max_items: ClassVar[int | None] = EXACT_MAX_ITEMS

    def search(
        self,
        scorer: Scorer,
        trie: CodeTrie,
        outputs: Sequence[np.ndarray],
        k: int,
        exclude: ExcludeArg = None,
    ) -> SearchResult:
        self.check_k(k)
        return top_k_unseen(scorer.all_scores(*outputs), k, exclude)
