"""Leave-one-out metrics against hand-computed values."""

import math

import numpy as np
import pytest

from model.evaluate.metrics import invalid_item_rate, recall_ndcg, target_ranks


def test_hand_computed_recall_and_ndcg():
    ranked = np.array(
        [
            [7, 1, 2, 3, 4, 5, 6, 8, 9, 10],  # target 7 at rank 0
            [0, 1, 2, 3, 4, 5, 6, 8, 9, 7],  # target 7 at rank 9: in @10 only
            [0, 1, 7, 3, 4, 5, 6, 8, 9, 10],  # target 7 at rank 2
            [0, 1, 2, 3, 4, 5, 6, 8, -1, -1],  # target absent, list padded
        ]
    )
    targets = np.array([7, 7, 7, 7])
    m = recall_ndcg(ranked, targets)
    assert list(m) == ["recall@5", "ndcg@5", "recall@10", "ndcg@10"]
    assert m["recall@5"] == pytest.approx(2 / 4)
    assert m["recall@10"] == pytest.approx(3 / 4)
    assert m["ndcg@5"] == pytest.approx((1.0 + 1 / math.log2(4)) / 4)
    assert m["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(11) + 1 / math.log2(4)) / 4)


def test_rank_is_first_hit_and_empty_slots_never_match():
    ranked = np.array([[3, 5, 5], [-1, -1, -1]])
    assert target_ranks(ranked, np.array([5, 0])).tolist() == [1, 3]


def test_custom_ks_and_errors():
    ranked = np.array([[1, 2, 3]])
    assert recall_ndcg(ranked, np.array([2]), ks=(1, 2)) == {
        "recall@1": 0.0,
        "ndcg@1": 0.0,
        "recall@2": 1.0,
        "ndcg@2": pytest.approx(1 / math.log2(3)),
    }
    with pytest.raises(ValueError, match="k=5"):
        recall_ndcg(ranked, np.array([2]), ks=(5,))
    with pytest.raises(ValueError, match="no users"):
        recall_ndcg(np.zeros((0, 10), dtype=np.int64), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="targets"):
        recall_ndcg(ranked, np.array([1, 2]))


def test_invalid_item_rate_counts_out_of_catalog_repeats_and_excluded():
    ranked = np.array(
        [
            [0, 1, 2, -1],  # all fine, one empty slot (not counted)
            [3, 3, 9, 1],  # a repeat of 3 and 9 >= num_items
            [4, 0, 2, 3],  # 4 was seen
        ]
    )
    exclude = [None, np.array([], dtype=np.int64), np.array([4])]
    assert invalid_item_rate(ranked, num_items=5, exclude=exclude) == pytest.approx(3 / 11)
    assert invalid_item_rate(ranked, num_items=5) == pytest.approx(2 / 11)
    assert invalid_item_rate(ranked, num_items=10) == pytest.approx(1 / 11)
    assert invalid_item_rate(np.full((2, 3), -1), num_items=5) == 0.0
