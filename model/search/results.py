"""What every search returns and how every search reads its exclusions (numpy only: the service imports it).

The beam kernel, the exact kernels and every search mode share these two pieces, so they live below
all of them: no search module has to import another to return a result or drop a seen item.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ExcludeArg = Sequence[np.ndarray | Sequence[int] | None] | None


@dataclass(frozen=True)
class SearchResult:
    """Top-k per user, best first: ``items`` int64 ``[B, k]`` (-1 = padding), ``scores`` float32 (-inf)."""

    items: np.ndarray
    scores: np.ndarray


def excluded_pairs(exclude: ExcludeArg, batch: int, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated distinct ``(users, items)`` of every excluded pair, users ascending (the exclusion
    argument of every search: per user an int array of item indices, or None)."""
    empty = np.zeros(0, dtype=np.int64)
    if exclude is None:
        return empty, empty
    if len(exclude) != batch:
        raise ValueError(f"exclude must have one entry per user ({batch}), got {len(exclude)}")
    keys = []
    for user, items in enumerate(exclude):  # O(B) bookkeeping, outside the per-level hot path
        if items is None:
            continue
        items = np.unique(np.asarray(items, dtype=np.int64).reshape(-1))
        if items.size and (items[0] < 0 or items[-1] >= num_items):
            raise ValueError(f"exclude[{user}] holds item indices outside the catalog [0, {num_items})")
        keys.append(user * num_items + items)
    keys = np.concatenate(keys) if keys else empty  # sorted: users ascending
    users, items = np.divmod(keys, max(num_items, 1))
    return users, items
