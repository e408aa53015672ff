"""Synthetic generator: determinism, round trip through the benchmark format, learnable signal."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest

from model.data import generate_synthetic, load_benchmark, load_dataset, write_benchmark


def test_same_seed_same_data_other_seed_other_data():
    a = generate_synthetic(300, 120, noise=0.2, seed=7)
    b = generate_synthetic(300, 120, noise=0.2, seed=7)
    c = generate_synthetic(300, 120, noise=0.2, seed=8)
    assert a.fingerprint() == b.fingerprint() and a.item_fields == b.item_fields
    assert a.fingerprint() != c.fingerprint()
    assert a.item_fields != c.item_fields


def test_shapes_lengths_and_readable_text():
    ds = generate_synthetic(2000, 500, noise=0.1, seed=1, min_length=5, max_length=30)
    assert ds.num_items == 2000 and ds.num_users == 500
    assert len(set(ds.item_ids)) == 2000 and len(set(ds.user_ids)) == 500
    lengths = np.array([len(s) for s in ds.sequences])
    assert lengths.min() >= 5 and lengths.max() <= 30
    assert 7 <= lengths.mean() <= 12  # Amazon-like: min 5, mean ~9
    for seq in ds.sequences:
        assert len(np.unique(seq)) == len(seq)  # no repeated item within a user
        assert seq.min() >= 0 and seq.max() < 2000
    title, brand, cats = (ds.item_fields[k][0] for k in ("title", "brand", "categories"))
    assert brand.lower() in title and " | " in cats
    assert title.split()[-1] in cats.lower()  # the product noun names the category
    assert "asin" in ds.item_meta and ds.item_meta["asin"][0] not in ds.item_texts()[0]


def test_round_trip_through_the_benchmark_format(tmp_path):
    ds = generate_synthetic(400, 150, noise=0.1, seed=3, name="Synth")
    write_benchmark(ds, tmp_path)
    back = load_benchmark(tmp_path, max_history=ds.max_history)
    assert back.name == "Synth"
    assert back.item_ids == ds.item_ids and back.user_ids == ds.user_ids
    assert back.item_fields == ds.item_fields and back.item_meta == ds.item_meta
    assert back.fingerprint() == ds.fingerprint()


def test_noise_share_controls_random_clicks():
    """With noise=1 every click is random: no chain structure, so category runs are rare."""

    def same_category_share(noise: float) -> float:
        ds = generate_synthetic(2000, 400, noise=noise, seed=0)
        cats = np.array(ds.item_fields["categories"])
        pairs = [(a, b) for s in ds.sequences for a, b in zip(s[:-1], s[1:], strict=True)]
        return float(np.mean([cats[a] == cats[b] for a, b in pairs]))

    assert same_category_share(0.0) > 0.3
    assert same_category_share(1.0) < 0.05


def test_sequence_signal_beats_popularity():
    """A first-order transition model trained on the training part beats popularity by far on test."""
    ds = generate_synthetic(1500, 1500, noise=0.1, seed=0)
    following: dict[int, Counter] = defaultdict(Counter)
    for seq in ds.sequences:
        train = seq[:-1].tolist()
        for a, b in zip(train[:-1], train[1:], strict=True):
            following[a][b] += 1
    popular = set(np.argsort(-ds.item_popularity())[:10].tolist())
    split = ds.eval_split("test")
    pop_hits = markov_hits = 0
    for history, target in zip(split.histories, split.targets.tolist(), strict=True):
        pop_hits += target in popular
        scores: Counter = Counter()
        for age, item in enumerate(history[::-1][:3].tolist()):
            for nxt, count in following[item].items():
                scores[nxt] += count / (age + 1)
        markov_hits += target in {i for i, _ in scores.most_common(10)}
    n = len(split.targets)
    assert markov_hits / n > 0.2
    assert markov_hits / n > 4 * pop_hits / n


def test_spec_string_and_validation():
    ds = load_dataset("synthetic:items=120,users=30,noise=0,seed=5,name=Demo", max_history=5)
    assert (ds.name, ds.num_items, ds.num_users, ds.max_history) == ("Demo", 120, 30, 5)
    with pytest.raises(ValueError, match="noise"):
        generate_synthetic(10, 10, noise=1.5)
    with pytest.raises(ValueError, match="keys"):
        load_dataset("synthetic:bogus=1")


def test_scales_to_many_categories():
    ds = generate_synthetic(20_000, 50, seed=0, num_categories=4000)
    names = set(ds.item_fields["categories"])
    assert len(names) == 4000  # every category exists and has a distinct readable name
