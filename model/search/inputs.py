"""Histories of item indices -> the model's input arrays (shared by evaluation, export checks and the service).

numpy only (the service imports it). Histories are LEFT-padded so the newest item is always in the last
column: the model reads the user state at a fixed position whatever the history length.

``histories_to_inputs`` gives ``ModelInputs`` (codes, item indices, mask): what the PyTorch network
reads. An exported graph reads one of three input sets (``GRAPH_INPUTS``), and ``graph_feeds`` is the one
place that turns ``ModelInputs`` into the feeds of a graph: schema 2/3 graphs take the item indices and
look the ID embeddings up inside the graph; schema 4 graphs of item-ID models take ``item_inputs``
``[B, N, D]``, the input vector of every history item, gathered here from the bundle's
``item_inputs.npy`` ``[I, D]`` (``gather_item_inputs``; 0 for padding and unknown items), so the graph
holds no catalog-sized table; schema 4 graphs of models without item IDs take codes and mask only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

ITEM_INDEX_INPUTS = ("codes", "items", "item_mask")  # schema 2/3 graphs: the ID lookup is in the graph
ITEM_VECTOR_INPUTS = ("codes", "item_inputs", "item_mask")  # schema 4, item-ID models: gathered vectors
CODE_INPUTS = ("codes", "item_mask")  # schema 4, models without item IDs
GRAPH_INPUTS = (ITEM_INDEX_INPUTS, ITEM_VECTOR_INPUTS, CODE_INPUTS)  # the input sets a graph may have


class ModelInputs(NamedTuple):
    codes: np.ndarray  # int64 [B, N, L] semantic-ID codes of each history item, 0 for padding
    items: np.ndarray  # int64 [B, N] item indices, -1 for padding (read by item-ID models)
    item_mask: np.ndarray  # bool [B, N] True for real items


def histories_to_inputs(
    histories: Sequence[np.ndarray | Sequence[int]],
    codes_table: np.ndarray,
    max_history: int,
) -> ModelInputs:
    """Turn per-user item-index histories (oldest first) into ``(codes, items, item_mask)``.

    * ``codes``: int64 ``[B, N, L]``, the semantic-ID codes of each history item, 0 for padding;
    * ``items``: int64 ``[B, N]``, the item indices, -1 for padding;
    * ``item_mask``: bool ``[B, N]``, True for real items.

    Each history is truncated to its last ``max_history`` items; ``N`` is the longest truncated history
    of the batch, at least 1 (an empty history yields one all-padding row, mask all False).
    """
    codes_table = np.asarray(codes_table)
    if codes_table.ndim != 2:
        raise ValueError(f"codes_table must be [num_items, L], got shape {codes_table.shape}")
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    num_items, length = codes_table.shape
    batch = len(histories)

    # Only the per-user truncation touches Python; gathering the codes is one vectorised step.
    recent = [np.asarray(h, dtype=np.int64).reshape(-1)[-max_history:] for h in histories]
    lengths = np.fromiter((len(h) for h in recent), dtype=np.int64, count=batch)
    width = max(int(lengths.max()) if batch else 0, 1)
    flat = np.concatenate(recent) if batch else np.zeros(0, dtype=np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= num_items):
        bad = int(np.flatnonzero((flat < 0) | (flat >= num_items))[0])
        user = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
        raise ValueError(
            f"history of user {user} (batch position) holds item index {int(flat[bad])}, "
            f"outside the catalog [0, {num_items})"
        )

    rows = np.repeat(np.arange(batch), lengths)
    # column of each item: right-aligned, so the row's first kept item sits at width - length.
    within = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    cols = width - lengths[rows] + within

    codes = np.zeros((batch, width, length), dtype=np.int64)
    items = np.full((batch, width), -1, dtype=np.int64)
    item_mask = np.zeros((batch, width), dtype=bool)
    codes[rows, cols] = codes_table[flat]
    items[rows, cols] = flat
    item_mask[rows, cols] = True
    return ModelInputs(codes, items, item_mask)


def gather_item_inputs(items: np.ndarray, item_inputs: np.ndarray) -> np.ndarray:
    """``items`` int ``[B, N]`` -> float32 ``[B, N, D]``: row ``items[b, n]`` of ``item_inputs`` ``[I, D]``
    (the bundle's ``item_inputs.npy``), 0 for padding/unknown (-1) and any index outside ``[0, I)``:
    what ``FAIR.id_input`` adds to the history item's tokens in eval mode."""
    items = np.asarray(items, dtype=np.int64)
    if item_inputs.ndim != 2:
        raise ValueError(f"item_inputs must be [num_items, D], got shape {item_inputs.shape}")
    known = (items >= 0) & (items < item_inputs.shape[0])
    out = np.zeros((*items.shape, item_inputs.shape[1]), dtype=np.float32)
    out[known] = item_inputs[items[known]]
    return out


def graph_feeds(
    inputs: ModelInputs, names: Sequence[str], item_inputs: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The feeds of a graph whose inputs are ``names`` (one of ``GRAPH_INPUTS``, in any order) for
    ``inputs``; ``item_inputs`` ``[I, D]`` float32 is needed by a graph with an ``item_inputs`` input."""
    if sorted(names) not in [sorted(s) for s in GRAPH_INPUTS]:
        raise ValueError(f"graph inputs {list(names)} are none of {[list(s) for s in GRAPH_INPUTS]}")
    feeds = {}
    for name in names:
        if name == "item_inputs":
            if item_inputs is None:
                raise ValueError("the graph takes item_inputs: pass the [I, D] item input table")
            feeds[name] = gather_item_inputs(inputs.items, item_inputs)
        else:
            feeds[name] = getattr(inputs, name)
    return feeds
