"""FAIR trained briefly on synthetic data beats the popularity baseline on held-out (test) targets."""

from __future__ import annotations

import json

import torch
from conftest import random_unique_codes

from model.data.loading import load_dataset
from model.evaluate.metrics import recall_ndcg
from model.evaluate.popularity import popularity_order, rank_by_popularity
from model.semantic_ids.table import SemanticIdTable
from model.train.cli import main

torch.set_num_threads(1)
SPEC = "synthetic:items=200,users=800,seed=2"


def test_brief_training_beats_popularity_on_test_targets(tmp_path):
    dataset = load_dataset(SPEC)
    sid = tmp_path / "sid.npz"
    SemanticIdTable(dataset.item_ids, random_unique_codes(dataset.num_items, 2, 32, seed=3), 32).save(sid)
    out = tmp_path / "run"
    sets = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "train.batch_size=64",
            "train.warmup_steps=10", "train.max_steps=120", "train.eval_every=60", "train.lr=3e-3"]  # fmt: skip
    args = ["--data", SPEC, "--sid", str(sid), "--out", str(out), "--quiet"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0  # default FAIR: focused + both losses
    metrics = json.loads((out / "metrics.json").read_text())
    split = dataset.eval_split("test")
    popular = rank_by_popularity(popularity_order(dataset.item_popularity()), split.histories, k=10)
    baseline = recall_ndcg(popular, split.targets)
    assert metrics["test"]["users"] == len(split.targets)
    assert metrics["test"]["ndcg@10"] > 1.5 * baseline["ndcg@10"], (metrics["test"], baseline)
    assert metrics["test"]["recall@10"] > baseline["recall@10"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["kind"] == "train"]
    assert train[-1]["next"] < train[0]["next"] and {"robust", "mi", "seq_per_s"} <= set(train[-1])
