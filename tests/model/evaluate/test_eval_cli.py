"""``fair-eval`` in-process: a hand-made run directory, the popularity baseline, and clear errors."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.data.benchmark import write_benchmark
from model.data.loading import load_dataset
from model.data.synthetic import generate_synthetic
from model.evaluate.cli import main
from model.fair import FAIR, FAIRConfig
from model.semantic_ids.table import SemanticIdTable
from model.train.checkpoint import load_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[3]
KEYS = {"recall@5", "recall@10", "ndcg@5", "ndcg@10", "invalid_rate", "users", "split", "seconds"}


@pytest.fixture(scope="module")
def data_and_run(tmp_path_factory):
    """A synthetic benchmark folder and a run directory laid out as fair-train writes it (untrained)."""
    root = tmp_path_factory.mktemp("eval")
    ds = generate_synthetic(num_items=70, num_users=90, seed=0)
    data = write_benchmark(ds, root / "data")
    rng = np.random.default_rng(0)
    flat = rng.choice(8**3, size=ds.num_items, replace=False)
    table = SemanticIdTable(ds.item_ids, np.stack([flat // 64, flat // 8 % 8, flat % 8], axis=1), 8)
    run = root / "run"
    table.save(run / "semantic_ids.npz")
    cfg = FAIRConfig(num_levels=3, codebook_size=8, max_items=10, d_model=16, n_layers=1, n_heads=2)
    torch.manual_seed(0)
    model = FAIR(cfg)
    ckpt = {
        "model": model.state_dict(),
        "model_config": cfg.to_dict(),
        "train_config": {"max_history": 10},
        "step": 0,
        "sid_sha256": table.sha256(),
        "data_fingerprint": ds.fingerprint(),
    }
    save_checkpoint(run / "best.pt", ckpt)
    save_checkpoint(run / "checkpoint.pt", ckpt)
    return ds, data, run


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def _leave_one_out(ranked: list[list[int]], targets) -> dict[str, float]:
    """Recall/NDCG@5/10 written out from the definition (one relevant item per user), not through
    model.evaluate.metrics: the numbers fair-eval prints must equal these."""
    out = {}
    for k in (5, 10):
        ranks = [row[:k].index(t) if t in row[:k] else None for row, t in zip(ranked, targets, strict=True)]
        out[f"recall@{k}"] = float(np.mean([r is not None for r in ranks]))
        out[f"ndcg@{k}"] = float(np.mean([0.0 if r is None else 1 / np.log2(r + 2) for r in ranks]))
    return out


def _expected_model_ranking(run: Path, data: Path, split: str) -> tuple[list[list[int]], np.ndarray]:
    """The run's top-10 per user of ``split``, one user at a time through the network's reference item
    score (``FAIR.item_logits``, every catalog item), seen items removed: independent of the batched
    search fair-eval runs."""
    model, _ = load_model(run / "best.pt")
    model.eval()
    table = SemanticIdTable.load(run / "semantic_ids.npz")
    ev = load_dataset(data, max_history=10).eval_split(split)
    codes_table = torch.from_numpy(np.asarray(table.codes, dtype=np.int64))
    ranked = []
    with torch.no_grad():
        for history in ev.histories:
            items = torch.from_numpy(np.asarray(history, dtype=np.int64))[None]
            out = model(
                codes_table[items], torch.ones_like(items, dtype=torch.bool), items=items, last_only=True
            )
            scores = model.item_logits(out.history[:, -1], codes_table)[0].numpy()
            scores[np.asarray(history)] = -np.inf
            ranked.append([int(i) for i in np.argsort(-scores, kind="stable")[:10]])
    return ranked, np.asarray(ev.targets)


def test_run_json_last_line(data_and_run, capsys):
    ds, data, run = data_and_run
    assert main(["--run", str(run), "--data", str(data), "--json", "--beam", "12", "--batch-size", "32"]) == 0
    report = _last_json(capsys)
    assert set(report) >= KEYS
    assert report["split"] == "test" and report["users"] == len(ds.eval_split("test").targets)
    assert report["invalid_rate"] == 0.0
    assert report["max_history"] == 10  # taken from the run's train_config
    expected = _leave_one_out(*_expected_model_ranking(run, data, "test"))
    assert expected["recall@10"] > 0  # some targets are found: the comparison is of real rankings
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, abs=1e-12), (key, report, expected)


def test_popularity_baseline_json(data_and_run, capsys):
    ds, data, _ = data_and_run
    assert main(["--baseline", "popularity", "--data", str(data), "--split", "valid", "--json"]) == 0
    report = _last_json(capsys)
    assert set(report) >= KEYS
    assert report["split"] == "valid" and report["users"] == len(ds.eval_split("valid").targets)
    assert report["invalid_rate"] == 0.0
    # the baseline by hand: items by interactions in the training part (every sequence but its last
    # two items, for the valid split), ties to the lower index, the user's history skipped
    counts = np.zeros(ds.num_items, dtype=np.int64)
    for seq in ds.sequences:
        for item in seq[:-2]:
            counts[item] += 1
    order = sorted(range(ds.num_items), key=lambda i: (-counts[i], i))
    ev = ds.eval_split("valid")
    ranked = [[i for i in order if i not in set(np.asarray(h).tolist())][:10] for h in ev.histories]
    expected = _leave_one_out(ranked, np.asarray(ev.targets))
    assert expected["recall@10"] > 0
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, abs=1e-12), (key, report, expected)


def test_user_sample_is_seeded_and_shared_by_run_and_baseline(data_and_run, capsys):
    """--users N ranks a seeded sample of N users, in dataset order; the same N and seed give the same
    users (and so the same metrics), another seed other users."""
    ds, data, run = data_and_run
    total = len(ds.eval_split("test").targets)
    sample = ds.eval_split("test").sample(20, seed=3)
    assert len(sample.users) == 20 and list(sample.users) == sorted(sample.users)
    assert list(sample.users) == list(ds.eval_split("test").sample(20, seed=3).users)
    assert list(sample.users) != list(ds.eval_split("test").sample(20, seed=4).users)
    assert ds.eval_split("test").sample(total + 5).users.size == total  # more than there are: all
    runs = []
    for _ in range(2):
        assert (
            main(["--run", str(run), "--data", str(data), "--users", "20", "--sample-seed", "3", "--json"])
            == 0
        )
        runs.append(_last_json(capsys))
    assert runs[0]["users"] == 20 and runs[0]["ndcg@10"] == runs[1]["ndcg@10"]
    assert (
        main(
            ["--baseline", "popularity", "--data", str(data), "--users", "20", "--sample-seed", "3", "--json"]
        )
        == 0
    )
    assert _last_json(capsys)["users"] == 20
    with pytest.raises(SystemExit):
        main(["--baseline", "popularity", "--data", str(data), "--users", "0"])
    assert "--users must be >= 1" in capsys.readouterr().err


def test_clear_errors(data_and_run, tmp_path, capsys):
    _, data, run = data_and_run
    assert main(["--run", str(tmp_path / "nope"), "--data", str(data)]) == 2
    assert "no such run directory" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run / "semantic_ids.npz", partial / "semantic_ids.npz")
    assert main(["--run", str(partial), "--data", str(data)]) == 2
    assert "best.pt: no such checkpoint" in capsys.readouterr().err
    # data whose catalog is not the run's: the table check names both sides
    other = write_benchmark(
        generate_synthetic(num_items=50, num_users=40, seed=1, name="Other"), tmp_path / "o"
    )
    assert main(["--run", str(run), "--data", str(other), "--checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fair-eval: error: semantic-ID table does not match") and err.count("\n") == 1


def test_noise_experiment_script_writes_one_markdown_table(data_and_run, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("noise_experiment", ROOT / "bench" / "noise_experiment.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _, data, run = data_and_run
    out = tmp_path / "noise.md"
    argv = ["--run", str(run), "--data", str(data), "--n", "1", "3", "--beam", "10", "--out", str(out)]
    assert script.main(argv) == 0
    lines = out.read_text().splitlines()
    assert [line.split("|")[2].strip() for line in lines[2:5]] == ["0", "1", "3"]
    assert lines[2].startswith("| run (focused) |")
    assert "noise seed 0" in lines[-1]
    assert capsys.readouterr().out.strip() == out.read_text().strip()
