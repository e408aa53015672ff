"""histories_to_inputs: left padding (newest item last), truncation, empty histories, bad indices;
graph_feeds / gather_item_inputs: the feeds of each graph input set, item input vectors gathered."""

import numpy as np
import pytest

from model.search.inputs import (
    CODE_INPUTS,
    ITEM_INDEX_INPUTS,
    ITEM_VECTOR_INPUTS,
    gather_item_inputs,
    graph_feeds,
    histories_to_inputs,
)

# item i has codes (10 * i, 10 * i + 1)
TABLE = np.stack([np.arange(8) * 10, np.arange(8) * 10 + 1], axis=1)


def test_left_padded_with_newest_item_last():
    codes, items, mask = histories_to_inputs([np.array([3, 5]), [1, 2, 4]], TABLE, max_history=10)
    assert codes.dtype == np.int64 and items.dtype == np.int64 and mask.dtype == bool
    assert items.tolist() == [[-1, 3, 5], [1, 2, 4]]
    assert codes.shape == (2, 3, 2) and mask.shape == (2, 3)
    assert mask.tolist() == [[False, True, True], [True, True, True]]
    assert codes[0].tolist() == [[0, 0], [30, 31], [50, 51]]
    assert codes[1, :, 0].tolist() == [10, 20, 40]


def test_truncates_to_the_most_recent_items():
    codes, items, mask = histories_to_inputs([np.arange(8), np.array([6])], TABLE, max_history=3)
    assert codes.shape == (2, 3, 2) and items.tolist() == [[5, 6, 7], [-1, -1, 6]]
    assert codes[0, :, 0].tolist() == [50, 60, 70]
    assert mask[1].tolist() == [False, False, True] and codes[1, 2, 0] == 60


def test_empty_histories_give_one_padding_row():
    codes, items, mask = histories_to_inputs([np.array([], dtype=np.int64), []], TABLE, max_history=5)
    assert codes.shape == (2, 1, 2) and not mask.any() and not codes.any() and (items == -1).all()
    codes, _, mask = histories_to_inputs([[], [2]], TABLE, max_history=5)
    assert mask.tolist() == [[False], [True]] and codes[1, 0].tolist() == [20, 21]


def test_bad_input_is_refused_with_the_user_named():
    with pytest.raises(ValueError, match="user 1 .* item index 8"):
        histories_to_inputs([[1], [2, 8]], TABLE, max_history=5)
    with pytest.raises(ValueError, match="item index -1"):
        histories_to_inputs([[-1]], TABLE, max_history=5)
    with pytest.raises(ValueError, match="max_history"):
        histories_to_inputs([[1]], TABLE, max_history=0)


# item i's input vector: (i + 1) * [1, 2, 3]
ITEM_INPUTS = ((np.arange(8)[:, None] + 1) * np.array([1.0, 2.0, 3.0])).astype(np.float32)


def test_unknown_padding_and_out_of_catalog_items_gather_a_zero_input_vector():
    items = np.array([[-1, 3, 7], [8, -1, 100], [0, -5, 2]])
    got = gather_item_inputs(items, ITEM_INPUTS)
    assert got.dtype == np.float32 and got.shape == (3, 3, 3)
    np.testing.assert_array_equal(got[0], [[0, 0, 0], [4, 8, 12], [8, 16, 24]])
    assert not got[1].any()  # 8 and 100 lie outside the 8-item catalog, -1 is padding/unknown
    np.testing.assert_array_equal(got[2], [[1, 2, 3], [0, 0, 0], [3, 6, 9]])


def test_graph_feeds_follow_the_graph_inputs():
    inputs = histories_to_inputs([[3, 5], [1, 2, 4]], TABLE, max_history=10)
    old = graph_feeds(inputs, ITEM_INDEX_INPUTS)  # schema 3: the item indices
    assert list(old) == list(ITEM_INDEX_INPUTS) and (old["items"] == inputs.items).all()
    new = graph_feeds(inputs, ITEM_VECTOR_INPUTS, ITEM_INPUTS)  # schema 4: gathered vectors
    assert list(new) == list(ITEM_VECTOR_INPUTS) and new["item_inputs"].shape == (2, 3, 3)
    assert not new["item_inputs"][0, 0].any()  # padding
    np.testing.assert_array_equal(new["item_inputs"][1, :, 0], [2, 3, 5])
    assert new["codes"] is inputs.codes and new["item_mask"] is inputs.item_mask
    assert list(graph_feeds(inputs, CODE_INPUTS)) == list(CODE_INPUTS)
    with pytest.raises(ValueError, match="item input table"):
        graph_feeds(inputs, ITEM_VECTOR_INPUTS)
    with pytest.raises(ValueError, match="none of"):
        graph_feeds(inputs, ("codes", "items"))
