"""``beam``: the constrained beam over semantic-ID prefixes proposes candidates, rescored in full.

The beam (``model.search.beam.constrained_beam_search``, beam width = ``candidates``) ranks by the
code part alone, which is all a prefix has; this mode then rescores its ``candidates`` items with the
full item score (code part + ID part) and keeps the top k. The beam never sees the ID part, so it
needs width; it is the search for catalogs too large to score whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from model.search.beam import constrained_beam_search
from model.search.item_scores import Scorer
from model.search.modes.base import Param, RescoresCandidates, SearchMode
from model.search.results import ExcludeArg, SearchResult
from model.search.scoring import top_k
from model.semantic_ids.trie import CodeTrie

DEFAULT_CANDIDATES = 200


@dataclass(frozen=True)
class BeamMode(RescoresCandidates, SearchMode):
    """Beam candidates (``candidates`` of them), rescored by the full item score."""

    name: ClassVar[str] = "beam"
    help: ClassVar[str] = "the semantic-ID beam proposes candidates, rescored by the full item score"
    params: ClassVar[tuple[Param, ...]] = (
        Param(
            "candidates",
            DEFAULT_CANDIDATES,
            1,
            "candidates rescored by the full item score (beam: its width)",
        ),
    )

    candidates: int = DEFAULT_CANDIDATES

    def search(
        self,
        scorer: Scorer,
        trie: CodeTrie,
        outputs: Sequence[np.ndarray],
        k: int,
        exclude: ExcludeArg = None,
    ) -> SearchResult:
        self.check_k(k)
        outputs = scorer.check_outputs(*outputs)
        width = self.candidates
        proposed = constrained_beam_search(scorer.code_part(*outputs), trie, width, width, exclude)
        return rescore(scorer, outputs, proposed.items, k)


def rescore(scorer: Scorer, outputs: Sequence[np.ndarray], items: np.ndarray, k: int) -> SearchResult:
    """Top-k of the candidate ``items`` ``[B, C]`` (-1 = none) by the full item score."""
    scores = scorer.scores_of(*outputs, items)
    best = top_k(scores, k)
    picked = np.where(best.items >= 0, np.take_along_axis(items, np.maximum(best.items, 0), axis=1), -1)
    return SearchResult(items=picked, scores=best.scores)
