"""Offline side of FAIR: data, semantic IDs, the network, training and evaluation.

Sub-packages that the service imports (``model.data.dataset`` is not one of them, but
``model.semantic_ids.table``, ``model.semantic_ids.trie`` and ``model.search``) stay numpy-only:
nothing imported from this ``__init__`` may pull in torch.
"""
