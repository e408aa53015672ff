"""Search over the catalog: model inputs from histories, item scores, exact top-k and the constrained
beam over semantic IDs (candidate generation for catalogs too large to score whole).

numpy only: the service imports this package and must never pull in torch.
"""

from model.search.beam import SearchResult, constrained_beam_search, exact_topk
from model.search.inputs import ModelInputs, histories_to_inputs
from model.search.scoring import SEARCH_MODES, ItemScorer, search

__all__ = [
    "SEARCH_MODES",
    "ItemScorer",
    "ModelInputs",
    "SearchResult",
    "constrained_beam_search",
    "exact_topk",
    "histories_to_inputs",
    "search",
]
