"""Builders of tiny FAIR runs for export tests (imported by tests/export/conftest.py and the tests).

``build_tiny_run(dir)`` writes a fair-train-shaped run directory (checkpoint in the trainer's format,
semantic_ids.npz, popular.npy, metrics.json) around a tiny random FAIR network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from model.data.benchmark import write_benchmark
from model.data.dataset import SequenceDataset
from model.fair import FAIR, FAIRConfig
from model.semantic_ids.table import SemanticIdTable
from model.train.checkpoint import save_checkpoint, untrained_checkpoint

TINY_ITEMS = 120
TINY_CONFIG = dict(
    num_levels=3, codebook_size=16, max_items=8, d_model=16, n_layers=2, n_heads=2, mlp_ratio=2, dropout=0.0,
    num_items=TINY_ITEMS,
)  # fmt: skip
TINY_MAX_HISTORY = 6


def tiny_table(num_items: int = TINY_ITEMS, seed: int = 0) -> SemanticIdTable:
    """Random unique code tuples for ``num_items`` items ``item0..``."""
    rng = np.random.default_rng(seed)
    V, L = TINY_CONFIG["codebook_size"], TINY_CONFIG["num_levels"]
    flat = rng.choice(V**L, size=num_items, replace=False)
    codes = np.stack([(flat // V**p) % V for p in reversed(range(L))], axis=1)
    return SemanticIdTable([f"item{i}" for i in range(num_items)], codes, V, meta={"method": "random"})


def build_tiny_run(run_dir: Path, seed: int = 0, **config_overrides) -> Path:
    """A run directory as fair-train leaves it, around an untrained tiny FAIR network."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = FAIRConfig(**{**TINY_CONFIG, **config_overrides})
    model = FAIR(cfg)
    with torch.no_grad():  # peaked, untied scores, as a trained model has (no near-ties in top-10)
        model.head_bias.normal_(0.0, 2.0)
        if model.item_bias is not None:
            model.item_bias.normal_(0.0, 2.0)
            model.item_trained[::7] = False  # some items without a trained ID embedding
        if model.text_proj is not None:  # text embeddings of the items (model.item_text)
            model.item_text.normal_()
    table = tiny_table(seed=seed)
    table.save(run_dir / "semantic_ids.npz")
    np.save(run_dir / "popular.npy", np.arange(table.num_items, dtype=np.int64)[::-1].copy())
    (run_dir / "metrics.json").write_text(json.dumps({"test": {"recall@10": 0.5, "ndcg@10": 0.25}}))
    save_checkpoint(
        run_dir / "best.pt",
        untrained_checkpoint(
            model.state_dict(), cfg.to_dict(), table.sha256(), {"max_history": TINY_MAX_HISTORY}, None
        ),
    )
    return run_dir


def write_tiny_data(out_dir: Path, table: SemanticIdTable, users: int = 60, seed: int = 0) -> Path:
    """A benchmark-format dataset over the table's catalog (sequences of 3..10 items)."""
    rng = np.random.default_rng(seed)
    sequences = [
        rng.choice(table.num_items, size=int(rng.integers(3, 11)), replace=False) for _ in range(users)
    ]
    dataset = SequenceDataset(
        name="Tiny",
        item_ids=list(table.item_ids),
        item_fields={"title": [f"title {i}" for i in table.item_ids]},
        user_ids=[f"user{u}" for u in range(users)],
        sequences=[s.astype(np.int64) for s in sequences],
        max_history=TINY_MAX_HISTORY,
    )
    return write_benchmark(dataset, out_dir)
