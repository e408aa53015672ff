"""Semantic IDs: text embeddings -> residual quantization -> unique code tuples per item.

``table`` and ``trie`` are numpy-only (the service imports them); the quantizers may use torch.
"""
