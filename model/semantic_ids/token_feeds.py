"""The text encoder's ONNX inputs for a list of texts, numpy only.

``fair-export --item-encoder`` traces and checks the encoder with these arrays (export/item_encoder.py) and
the service feeds the exported graph with them (service/new_item_encoder.py): one function, so the graph
is checked on exactly the padding it is served with. Right padding with zeros; the attention mask marks
the real tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def token_feeds(tokenizer: Any, texts: Sequence[str], input_names: Iterable[str]) -> dict[str, np.ndarray]:
    """Padded int64 ``[len(texts), longest]`` arrays for the graph inputs ``input_names`` (``input_ids``,
    ``attention_mask`` and, when the graph takes it, ``token_type_ids``) from a ``tokenizers`` tokenizer."""
    encodings = tokenizer.encode_batch(list(texts))
    length = max(len(e.ids) for e in encodings)
    feeds = {name: np.zeros((len(texts), length), dtype=np.int64) for name in input_names}
    for j, e in enumerate(encodings):
        n = len(e.ids)
        feeds["input_ids"][j, :n] = e.ids
        feeds["attention_mask"][j, :n] = e.attention_mask
        if "token_type_ids" in feeds:
            feeds["token_type_ids"][j, :n] = e.type_ids
    return feeds
