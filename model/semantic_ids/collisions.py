"""Collision codes and code statistics.

Quantizers may give several items the same code tuple. A generative recommender must name exactly
one item per tuple, so (as in TIGER) one last code numbers the items within each group of equal
tuples 0, 1, 2, ... in catalog order. Every item then has a unique tuple of length ``levels + 1``,
and because the extra code is also in ``[0, codebook_size)`` the model keeps one vocabulary.
"""

from __future__ import annotations

import numpy as np

from model.semantic_ids.table import SemanticIdError, SemanticIdTable


class CollisionError(SemanticIdError):
    """More items share one code tuple than the codebook can number."""


def add_collision_code(codes: np.ndarray, codebook_size: int) -> tuple[np.ndarray, dict]:
    """Append the within-group rank to ``codes [N, l]``; returns ``(codes [N, l + 1], stats)``.

    ``stats``: ``collisions`` (items in groups of size > 1), ``collision_groups`` (such groups),
    ``max_collision_group`` (largest group, 1 when all tuples were already unique).
    """
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [N, levels], got shape {codes.shape}")
    n = len(codes)
    if n == 0:
        return np.zeros((0, codes.shape[1] + 1), dtype=np.int64), {
            "collisions": 0,
            "collision_groups": 0,
            "max_collision_group": 0,
        }
    _, group, sizes = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    biggest = int(sizes.max())
    if biggest > codebook_size:
        g = int(sizes.argmax())
        example = tuple(int(c) for c in codes[np.flatnonzero(group == g)[0]])
        raise CollisionError(
            f"{biggest} items share the code tuple {example} but the collision code can only separate "
            f"{codebook_size} (the codebook size); use a larger --codebook-size or more --levels"
        )
    # rank within group, catalog order: stable sort by group, then position minus the group's start
    order = np.argsort(group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, sizes)
    stats = {
        "collisions": int(sizes[sizes > 1].sum()),
        "collision_groups": int((sizes > 1).sum()),
        "max_collision_group": biggest,
    }
    return np.concatenate([codes, rank[:, None]], axis=1), stats


def utilization(codes: np.ndarray, codebook_size: int) -> list[float]:
    """Per level (column), the share of the ``codebook_size`` codes used by at least one item."""
    codes = np.asarray(codes)
    return [float(len(np.unique(codes[:, j])) / codebook_size) for j in range(codes.shape[1])]


def table_stats(table: SemanticIdTable) -> dict:
    """What ``fair-sid stats`` prints: size, uniqueness, per-level utilization, collisions.

    Collisions are read off the table itself (groups of items equal on all but the last code), so
    the numbers are right for any table, not just ones whose meta recorded them.
    """
    codes = table.codes
    n = table.num_items
    unique_ids = int(len(np.unique(codes, axis=0))) if n else 0
    if n and table.code_length > 1:
        _, sizes = np.unique(codes[:, :-1], axis=0, return_counts=True)
        collisions, biggest = int(sizes[sizes > 1].sum()), int(sizes.max())
    else:
        collisions, biggest = 0, 1 if n else 0
    return {
        "items": n,
        "unique_ids": unique_ids,
        "code_length": table.code_length,
        "codebook_size": table.codebook_size,
        "utilization": utilization(codes, table.codebook_size) if n else [0.0] * table.code_length,
        "collisions": collisions,
        "max_collision_group": biggest,
    }
