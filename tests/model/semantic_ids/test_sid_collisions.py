import numpy as np
import pytest

from model.semantic_ids.collisions import CollisionError, add_collision_code, table_stats, utilization
from model.semantic_ids.table import SemanticIdTable


def test_collision_code_numbers_items_within_each_group_in_catalog_order():
    codes = np.array([[1, 2], [0, 0], [1, 2], [3, 3], [1, 2], [0, 0]])
    full, stats = add_collision_code(codes, codebook_size=4)
    assert full.shape == (6, 3)
    np.testing.assert_array_equal(full[:, :2], codes)
    np.testing.assert_array_equal(full[:, 2], [0, 0, 1, 0, 2, 1])
    assert len(np.unique(full, axis=0)) == 6
    assert stats == {"collisions": 5, "collision_groups": 2, "max_collision_group": 3}


def test_unique_codes_get_collision_code_zero():
    codes = np.arange(10).reshape(5, 2)
    full, stats = add_collision_code(codes, codebook_size=16)
    np.testing.assert_array_equal(full[:, -1], 0)
    assert stats["collisions"] == 0 and stats["max_collision_group"] == 1


def test_random_codes_always_become_unique():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, size=(200, 2))  # 9 tuples for 200 items: big groups
    full, stats = add_collision_code(codes, codebook_size=64)
    assert len(np.unique(full, axis=0)) == 200
    assert full.max() < 64
    assert stats["max_collision_group"] == np.unique(codes, axis=0, return_counts=True)[1].max()


def test_group_larger_than_codebook_is_a_clear_error():
    codes = np.zeros((5, 2), dtype=np.int64)
    with pytest.raises(CollisionError, match=r"5 items share the code tuple \(0, 0\).*--codebook-size"):
        add_collision_code(codes, codebook_size=4)


def test_utilization_is_share_of_codes_used_per_level():
    codes = np.array([[0, 1], [1, 1], [2, 1], [3, 1]])
    assert utilization(codes, 8) == [0.5, 0.125]


def test_table_stats_reads_collisions_off_the_table():
    full, _ = add_collision_code(np.array([[1, 2], [1, 2], [0, 1], [5, 5]]), codebook_size=8)
    table = SemanticIdTable(item_ids=["a", "b", "c", "d"], codes=full, codebook_size=8)
    stats = table_stats(table)
    assert stats == {
        "items": 4,
        "unique_ids": 4,
        "code_length": 3,
        "codebook_size": 8,
        "utilization": [3 / 8, 3 / 8, 2 / 8],
        "collisions": 2,
        "max_collision_group": 2,
    }
