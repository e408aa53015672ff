"""fair-train for a few steps, then fair-eval on its run directory: the numbers must agree."""

import json

import numpy as np
import pytest

from model.data.loading import load_dataset
from model.evaluate.cli import main as fair_eval
from model.semantic_ids.table import SemanticIdTable
from model.train.cli import main as fair_train

DATA = "synthetic:items=60,users=120,seed=3"
TINY = {
    "model.num_levels": 3,
    "model.codebook_size": 8,
    "model.max_items": 10,
    "model.d_model": 16,
    "model.n_layers": 1,
    "model.n_heads": 2,
    "train.max_history": 10,
    "train.batch_size": 32,
    "train.max_steps": 12,
    "train.warmup_steps": 2,
    "train.eval_every": 6,
    "train.eval_users": 0,
    "train.eval_beam": 10,
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    ds = load_dataset(DATA)
    flat = np.random.default_rng(0).choice(8**3, size=ds.num_items, replace=False)
    sid = SemanticIdTable(ds.item_ids, np.stack([flat // 64, flat // 8 % 8, flat % 8], axis=1), 8).save(
        root / "sid.npz"
    )
    run = root / "run"
    sets = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    assert fair_train(["--data", DATA, "--sid", str(sid), "--out", str(run), "--quiet", *sets]) == 0
    return run


def test_fair_eval_reproduces_the_trainers_test_metrics(trained_run, capsys):
    capsys.readouterr()
    assert fair_eval(["--run", str(trained_run), "--data", DATA, "--beam", "10", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trainer = json.loads((trained_run / "metrics.json").read_text())["test"]
    assert report["invalid_rate"] == 0.0
    assert report["users"] == trainer["users"]
    for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
        assert report[key] == pytest.approx(trainer[key], abs=1e-9), key
