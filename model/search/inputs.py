"""Histories of item indices -> the model's input arrays (shared by evaluation, export checks and the service).

numpy only (the service imports it). Histories are LEFT-padded so the newest item is always in the last
column: the model reads the user state at a fixed position whatever the history length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

INPUT_NAMES = ("codes", "items", "item_mask")  # the exported graph's inputs, in this order


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
