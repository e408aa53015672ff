"""Search over semantic IDs: model inputs from histories, constrained beam search and exact top-k.

numpy only: the service imports this package and must never pull in torch.
"""

from model.search.beam import SearchResult, constrained_beam_search, exact_topk
from model.search.inputs import histories_to_inputs

__all__ = ["SearchResult", "constrained_beam_search", "exact_topk", "histories_to_inputs"]
