"""The noise-injection experiment: what gets inserted where, and the rows it reports."""

import numpy as np
import pytest

from model.data.synthetic import generate_synthetic
from model.evaluate.metrics import evaluation_report
from model.evaluate.noise import insert_noise, noise_experiment, noise_markdown
from model.evaluate.popularity import popularity_order, rank_by_popularity


def _check_noisy(clean, noisy, target, n, max_history):
    real = clean[-(max_history - n) :] if len(clean) + n > max_history else clean
    assert len(noisy) == len(real) + n <= max_history
    kept = np.isin(noisy, clean)
    assert noisy[kept].tolist() == real.tolist()  # real items keep their order, oldest dropped first
    noise = noisy[~kept]
    assert len(noise) == len(set(noise.tolist())) == n
    assert target not in noise.tolist()


def test_inserts_exactly_n_distinct_unseen_items_keeping_the_real_order():
    rng = np.random.default_rng(1)
    histories = [np.array([3, 1, 4]), np.arange(10, 20), np.array([7])]
    targets = np.array([5, 9, 2])
    for n in (1, 2, 5):
        noisy = insert_noise(histories, targets, num_items=40, n=n, max_history=10, rng=rng)
        for clean, out, target in zip(histories, noisy, targets, strict=True):
            _check_noisy(clean, out, target, n, max_history=10)
    assert [h.tolist() for h in insert_noise(histories, targets, 40, 0, 10, rng)] == [
        h.tolist() for h in histories
    ]


def test_positions_are_spread_and_seeded():
    histories = [np.arange(4)] * 400
    targets = np.full(400, 30)
    a = insert_noise(histories, targets, 50, 1, 20, np.random.default_rng(3))
    b = insert_noise(histories, targets, 50, 1, 20, np.random.default_rng(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    positions = [int(np.flatnonzero(h >= 4)[0]) for h in a]
    assert set(positions) == {0, 1, 2, 3, 4}  # before the oldest ... after the newest
    assert all(not np.isin(h, [30]).any() for h in a)


def test_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="no room"):
        insert_noise([np.array([1])], np.array([2]), 10, 5, 5, rng)
    with pytest.raises(ValueError, match="fewer than 3"):
        insert_noise([np.array([0, 1])], np.array([2]), 4, 3, 10, rng)


def test_experiment_rows_and_markdown_with_a_popularity_ranker():
    ds = generate_synthetic(num_items=60, num_users=120, seed=0)
    split = ds.eval_split("test")
    order = popularity_order(ds.item_popularity())

    def evaluate(histories):
        ranked = rank_by_popularity(order, histories, k=10)
        return evaluation_report(ranked, split.targets, ds.num_items, exclude=histories)

    rows = noise_experiment(
        evaluate, split.histories, split.targets, ds.num_items, [1, 5], 20, seed=0, label="pop"
    )
    assert [r["n"] for r in rows] == [0, 1, 5]
    clean = evaluate(split.histories)
    assert all(rows[0][key] == clean[key] for key in clean)
    for row in rows[1:]:
        assert row["drop"]["ndcg@10"] == pytest.approx(
            (rows[0]["ndcg@10"] - row["ndcg@10"]) / rows[0]["ndcg@10"]
        )
        assert row["invalid_rate"] == 0.0
    table = noise_markdown(rows).splitlines()
    assert len(table) == 2 + 3
    assert table[2].startswith("| pop | 0 | ") and table[2].endswith("| — | — |")
    assert table[4].endswith("% |") and table[4].count("|") == table[0].count("|")
