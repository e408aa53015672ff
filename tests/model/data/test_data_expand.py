"""fair-data expand: a small real-format source made here, expanded, checked against the documented rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from model.data.benchmark import write_benchmark
from model.data.cli import main
from model.data.dataset import SequenceDataset
from model.data.expand import ExpansionPlan, plan_expansion, reduced_matrix
from model.data.loading import load_dataset


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """A Beauty-like source: skewed item popularity (Zipf), history lengths 3..12, no repeats."""
    rng = np.random.default_rng(7)
    n_items, n_users = 40, 30
    weights = 1.0 / np.arange(1, n_items + 1)
    sequences = [
        rng.choice(n_items, size=int(rng.integers(3, 13)), replace=False, p=weights / weights.sum())
        for _ in range(n_users)
    ]
    dataset = SequenceDataset(
        name="Mini",
        item_ids=[str(i + 1) for i in range(n_items)],
        item_fields={
            "title": [f"product number {i + 1}" for i in range(n_items)],
            "brand": [f"Brand{i % 4}" for i in range(n_items)],
            "categories": [f"Makeup | Shelf {i % 3}" for i in range(n_items)],
        },
        user_ids=[f"U{u}" for u in range(n_users)],
        sequences=[np.asarray(s, dtype=np.int64) for s in sequences],
    )
    out = tmp_path_factory.mktemp("src") / "Mini"
    write_benchmark(dataset, out)
    return out


def _expand(source_dir, out, *extra: str) -> int:
    return main(["expand", "--data", str(source_dir), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def expanded(source_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "big"
    assert _expand(source_dir, out, "--items", "300", "--users", "100", "--interactions", "1000") == 0
    return out


def test_counts_are_the_documented_whole_multiples(source_dir, expanded):
    src = load_dataset(source_dir)
    events = sum(len(s) for s in src.sequences)
    k_i = math.ceil(300 / 40)
    k_u = max(math.ceil(100 / 30), math.ceil(1000 / events))
    big = load_dataset(expanded)
    assert big.num_items == k_i * 40
    assert big.num_users == k_u * 30
    assert sum(len(s) for s in big.sequences) == k_u * events
    report = json.loads((expanded / "expansion.json").read_text())
    assert (report["item_factor"], report["user_factor"]) == (k_i, k_u)


def test_same_arguments_same_bytes_other_seed_other_copies(source_dir, expanded, tmp_path):
    assert (
        _expand(source_dir, tmp_path / "again", "--items", "300", "--users", "100", "--interactions", "1000")
        == 0
    )
    for f in ("items.tsv.gz", "MiniExpanded.txt.gz", "expansion.json"):
        assert (tmp_path / "again" / f).read_bytes() == (expanded / f).read_bytes()
    other = tmp_path / "seed1"
    assert (
        _expand(
            source_dir, other, "--items", "300", "--users", "100", "--interactions", "1000", "--seed", "1"
        )
        == 0
    )
    assert (other / "MiniExpanded.txt.gz").read_bytes() != (expanded / "MiniExpanded.txt.gz").read_bytes()


def test_each_expanded_user_replays_its_source_history_in_order(source_dir, expanded):
    src = load_dataset(source_dir)
    big = load_dataset(expanded)
    origin = big.item_meta["source_item_id"]
    by_user = {
        uid: [src.item_ids[i] for i in seq] for uid, seq in zip(src.user_ids, src.sequences, strict=True)
    }
    for uid, seq in zip(big.user_ids, big.sequences, strict=True):
        source_user = uid.rsplit("-", 1)[0]
        assert [origin[i] for i in seq] == by_user[source_user]


def test_every_copy_has_the_source_text_attributes_and_its_own_variant(source_dir, expanded):
    src = load_dataset(source_dir)
    big = load_dataset(expanded)
    texts = big.item_texts()
    assert all(texts) and len(set(texts)) == big.num_items  # copies are distinguishable
    src_index = src.item_index()
    for k, iid in enumerate(big.item_ids):
        i = src_index[big.item_meta["source_item_id"][k]]
        for field in ("title", "brand", "categories"):
            assert big.item_fields[field][k] == src.item_fields[field][i]
        assert big.item_fields["variant"][k] == iid.rsplit("-", 1)[1]


def test_item_popularity_is_the_source_one_times_ku_over_ki(source_dir, expanded):
    src = load_dataset(source_dir)
    big = load_dataset(expanded)
    report = json.loads((expanded / "expansion.json").read_text())
    k_u, k_i = report["user_factor"], report["item_factor"]
    src_pop = np.bincount(np.concatenate(src.sequences), minlength=src.num_items)
    big_pop = np.bincount(np.concatenate(big.sequences), minlength=big.num_items)
    origin = np.asarray([src.item_index()[s] for s in big.item_meta["source_item_id"]])
    expected = src_pop[origin] * k_u / k_i
    assert np.all(big_pop >= np.floor(expected)) and np.all(big_pop <= np.ceil(expected))
    assert np.array_equal(np.bincount(origin, weights=big_pop, minlength=src.num_items), src_pop * k_u)
    # the sorted popularity curve is the source's, scaled, up to rounding: the shape is kept
    scaled = np.sort(np.repeat(src_pop, k_i) * k_u / k_i)
    assert np.abs(np.sort(big_pop) - scaled).max() < 1


def test_user_copies_meet_the_item_copies_of_their_reduced_matrix_row(source_dir, expanded):
    src = load_dataset(source_dir)
    big = load_dataset(expanded)
    report = json.loads((expanded / "expansion.json").read_text())
    plan = ExpansionPlan(**{k: report[k] for k in ExpansionPlan.__dataclass_fields__})
    w = reduced_matrix(plan)
    assert np.allclose(w.sum(axis=1), 1.0)
    assert np.allclose(w.sum(axis=0), plan.user_factor / plan.item_factor)
    counts = np.zeros_like(w)
    for uid, seq in zip(big.user_ids, big.sequences, strict=True):
        a = int(uid.rsplit("-", 1)[1])
        np.add.at(counts[a], np.asarray(seq) // src.num_items, 1)  # catalog is copy-major
    assert np.all(counts[w == 0] == 0)
    events = counts.sum(axis=1, keepdims=True)
    # every item's events of one user copy are spread exactly over the row's window: rounding
    # moves less than one event per item and arc end
    assert np.all(np.abs(counts - w * events) <= 2 * src.num_items)


def test_stats_json_reads_the_result(source_dir, expanded, capsys):
    src = load_dataset(source_dir)
    report = json.loads((expanded / "expansion.json").read_text())
    k_u, k_i = report["user_factor"], report["item_factor"]
    capsys.readouterr()
    assert main(["stats", str(expanded), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["name"] == "MiniExpanded"
    assert (stats["items"], stats["users"], stats["interactions"]) == (
        report["items"],
        report["users"],
        report["interactions"],
    )
    # an item's K_u * pop events go to distinct copies while there are fewer than K_i of them
    src_pop = np.bincount(np.concatenate(src.sequences), minlength=src.num_items)
    assert stats["items_with_interactions"] == int(np.minimum(k_i, k_u * src_pop).sum())
    assert "variant" in stats["item_fields"]


def test_defaults_take_users_from_items_and_ten_events_per_item(source_dir):
    src = load_dataset(source_dir)
    events = sum(len(s) for s in src.sequences)
    plan = plan_expansion(src, items=400)
    assert plan.item_factor == 10
    assert plan.user_factor == max(math.ceil(400 / 30), math.ceil(4000 / events))


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--items", "39", "--items 39 is below the source's 40 items"),
        ("--users", "29", "below the source's 30"),
    ],
)
def test_asking_for_less_than_the_source_is_a_clear_error(source_dir, tmp_path, capsys, flag, value, needle):
    args = ["--items", "400", flag, value] if flag != "--items" else [flag, value]
    assert _expand(source_dir, tmp_path / "o", *args) == 1
    err = capsys.readouterr().err
    assert err.startswith("fair-data: error:") and needle in err
    assert not (tmp_path / "o").exists()


def test_missing_source_folder_is_a_clear_error(tmp_path, capsys):
    assert _expand(tmp_path / "nope", tmp_path / "o", "--items", "100") == 1
    err = capsys.readouterr().err
    assert err.startswith("fair-data: error:") and "nope" in err and "no such file" in err


def test_help_explains_the_method_and_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["expand", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for needle in (
        "Kronecker",
        "--items",
        "--users",
        "--interactions",
        "--seed",
        "byte-identical",
        "variant",
    ):
        assert needle in out
