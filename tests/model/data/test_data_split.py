"""Leave-one-out on loaded data: last item = test target, second-to-last = valid, rest = training."""

from __future__ import annotations

import numpy as np

from model.data import load_dataset, write_benchmark


def test_leave_one_out_on_a_loaded_dataset(tmp_path):
    ds = load_dataset("synthetic:items=300,users=60,seed=2")
    write_benchmark(ds, tmp_path)
    ds = load_dataset(tmp_path, max_history=3)
    valid, test = ds.eval_split("valid"), ds.eval_split("test")
    train = ds.train_sequences()
    assert len(valid.users) == len(test.users) == len(train) == ds.num_users  # every user has >= 5 items
    for u in range(ds.num_users):
        seq = ds.sequences[u]
        assert test.targets[u] == seq[-1] and valid.targets[u] == seq[-2]
        np.testing.assert_array_equal(test.histories[u], seq[-4:-1])  # last max_history=3 before the target
        np.testing.assert_array_equal(valid.histories[u], seq[-5:-2])
        np.testing.assert_array_equal(train[u], seq[:-2])
    # popularity counts only the training part: no leakage of valid/test targets
    counts = ds.item_popularity()
    assert counts.sum() == sum(len(s) - 2 for s in ds.sequences)
