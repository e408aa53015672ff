"""The popularity baseline on a tiny synthetic dataset, scored through the shared metric code."""

import numpy as np
import pytest

from model.data.dataset import SequenceDataset
from model.evaluate.metrics import evaluation_report
from model.evaluate.popularity import popularity_order, rank_by_popularity


def _dataset() -> SequenceDataset:
    # training parts (all but the last two items): item 0 x3, item 1 x2, item 2 x1, items 3/4 never
    seqs = [[0, 1, 2, 3, 4], [0, 1, 4, 2], [0, 3, 1], [1, 2]]
    return SequenceDataset(
        name="tiny",
        item_ids=[f"i{i}" for i in range(6)],
        item_fields={},
        user_ids=[f"u{u}" for u in range(len(seqs))],
        sequences=[np.array(s, dtype=np.int64) for s in seqs],
    )


def test_order_by_training_counts_ties_by_index():
    ds = _dataset()
    counts = ds.item_popularity()
    assert counts.tolist() == [3, 2, 1, 0, 0, 0]
    assert popularity_order(counts).tolist() == [0, 1, 2, 3, 4, 5]


def test_seen_items_are_skipped_and_short_catalogs_padded():
    order = np.array([0, 1, 2, 3, 4, 5])
    hists = [np.array([0, 2]), np.array([], dtype=np.int64), np.array([0, 1, 2, 3, 4])]
    ranked = rank_by_popularity(order, hists, k=3)
    assert ranked.tolist() == [[1, 3, 4], [0, 1, 2], [5, -1, -1]]
    assert rank_by_popularity(order, hists, k=3, exclude_seen=False)[0].tolist() == [0, 1, 2]


def test_report_on_the_test_split():
    ds = _dataset()
    split = ds.eval_split("test")
    ranked = rank_by_popularity(popularity_order(ds.item_popularity()), split.histories, k=5)
    report = evaluation_report(ranked, split.targets, ds.num_items, split.histories, ks=(1, 5))
    # user 0: hist [0,1,2,3] -> [4,5]; target 4 at rank 0
    # user 1: hist [0,1,4] -> [2,3,5]; target 2 at rank 0
    # user 2: hist [0,3] -> [1,2,4,5]; target 1 at rank 0
    # user 3: hist [1] -> [0,2,3,4,5]; target 2 at rank 1
    assert ranked[:, :2].tolist() == [[4, 5], [2, 3], [1, 2], [0, 2]]
    assert report["users"] == 4
    assert report["recall@1"] == pytest.approx(3 / 4)
    assert report["recall@5"] == 1.0
    assert report["ndcg@5"] == pytest.approx((3 + 1 / np.log2(3)) / 4)
    assert report["invalid_rate"] == 0.0
