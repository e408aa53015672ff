"""Search over the catalog: model inputs from histories, item scores, exact top-k and the constrained
beam over semantic IDs (candidate generation for catalogs too large to score whole), and the registry
of search modes that rank with them (``model.search.modes``).

numpy only: the service imports this package and must never pull in torch.
"""

import model.search.modes.builtin  # noqa: F401  (registers the built-in search modes)
from model.search.beam import constrained_beam_search, exact_topk
from model.search.inputs import ModelInputs, histories_to_inputs
from model.search.item_scores import ItemScorer
from model.search.modes.registry import SEARCH_MODES, get_mode, mode_names
from model.search.results import SearchResult
from model.search.scoring import search

__all__ = [
    "SEARCH_MODES",
    "ItemScorer",
    "ModelInputs",
    "SearchResult",
    "constrained_beam_search",
    "exact_topk",
    "get_mode",
    "histories_to_inputs",
    "mode_names",
    "search",
]
