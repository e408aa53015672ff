"""Tiny synthetic data + semantic-ID tables shared by the training tests (seconds on 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.data.loading import load_dataset
from model.semantic_ids.table import SemanticIdTable
from model.train.cli import main as train_main

SPEC = "synthetic:items=120,users=160,seed=1"
# a tiny, fast network: every test that trains uses it
TINY = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.dropout=0.1",
    "train.batch_size=32",
    "train.warmup_steps=2",
    "train.max_steps=400",
    "train.eval_every=3",
    "train.eval_users=40",
    "train.log_every=1",
]


def random_unique_codes(num_items: int, levels: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Distinct random code tuples: a valid (if meaningless) semantic-ID table."""
    rng = np.random.default_rng(seed)
    flat = rng.choice(vocab**levels, size=num_items, replace=False)
    return np.stack([(flat // vocab**i) % vocab for i in reversed(range(levels))], axis=1)


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> tuple[str, Path]:
    """(data spec for --data, path of a matching semantic-ID table with L=3, V=8)."""
    dataset = load_dataset(SPEC)
    path = tmp_path_factory.mktemp("sid") / "sid.npz"
    SemanticIdTable(dataset.item_ids, random_unique_codes(dataset.num_items, 3, 8), 8).save(path)
    return SPEC, path


def train_cli(spec: str, sid: Path, out: Path, *extra: str, sets: list[str] = TINY) -> int:
    """fair-train on the tiny setup (``sets`` as --set); a resume takes the run's own config, so no --set
    and no --out then."""
    args = ["--data", spec, "--sid", str(sid), "--quiet", "--no-final-eval", *extra]
    if "--resume" not in extra:
        args += ["--out", str(out)] + [a for item in sets for a in ("--set", item)]
    return train_main(args)
