"""histories_to_inputs: left padding (newest item last), truncation, empty histories, bad indices."""

import numpy as np
import pytest

from model.search.inputs import histories_to_inputs

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
