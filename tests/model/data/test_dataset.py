"""Leave-one-out split, popularity and fingerprint of the shared dataset type."""

import numpy as np
import pytest

from model.data.dataset import SequenceDataset


def make_dataset(max_history: int = 3) -> SequenceDataset:
    return SequenceDataset(
        name="tiny",
        item_ids=["a", "b", "c", "d", "e"],
        item_fields={"title": ["A", "B", "C", "D", "E"], "brand": ["x", "", "y", "y", "z"]},
        user_ids=["u1", "u2", "u3"],
        sequences=[np.array([0, 1, 2, 3, 4]), np.array([4, 3]), np.array([2, 0, 1])],
        max_history=max_history,
    )


def test_leave_one_out_targets_and_histories():
    ds = make_dataset(max_history=3)
    test = ds.eval_split("test")
    valid = ds.eval_split("valid")
    # u1: test target 4 with the last 3 items before it; valid target 3
    assert test.targets.tolist() == [4, 3, 1]
    assert [h.tolist() for h in test.histories] == [[1, 2, 3], [4], [2, 0]]
    # u2 has only 2 items: no validation target (its only history item would be the test history)
    assert valid.users.tolist() == [0, 2]
    assert valid.targets.tolist() == [3, 0]
    assert [h.tolist() for h in valid.histories] == [[0, 1, 2], [2]]


def test_training_part_never_contains_eval_targets():
    ds = make_dataset()
    train = ds.train_sequences()
    assert [t.tolist() for t in train] == [[0, 1, 2], [2]]
    pop = ds.item_popularity()
    assert pop.tolist() == [1, 1, 2, 0, 0]


def test_item_texts_skip_empty_fields():
    texts = make_dataset().item_texts()
    assert texts[0] == "title: A; brand: x"
    assert texts[1] == "title: B"


def test_fingerprint_changes_with_sequences():
    a, b = make_dataset(), make_dataset()
    assert a.fingerprint() == b.fingerprint()
    b.sequences[0] = np.array([0, 1, 2, 4, 3])
    assert a.fingerprint() != b.fingerprint()


def test_inconsistent_fields_are_rejected():
    with pytest.raises(ValueError, match="item field 'title' has 1 values for 2 items"):
        SequenceDataset("bad", ["a", "b"], {"title": ["A"]}, [], [])
    with pytest.raises(ValueError, match="split must be"):
        make_dataset().eval_split("train")
