"""Build the Beauty-sized bundle the load benchmark serves, when no trained Beauty run exists yet.

A DEFAULT-config FAIR network (untrained, random weights: latency does not depend on the weights)
over the real Beauty semantic IDs (``runs/sid/beauty_rqvae.npz``, 12,101 items, L=4, V=256), with
the real training-popularity fallback, written as a fair-train-shaped run directory and exported by
the real ``fair-export``. With a trained run, skip this and pass ``--run runs/<beauty run>``.

    .venv/bin/python bench/load/make_beauty_bundle.py --sid runs/sid/beauty_rqvae.npz \\
        --data ../shared/data/amazon/Beauty --out runs/load-bench
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from export.cli import main as export_main
from model.data.loading import load_dataset
from model.fair import FAIR, FAIRConfig
from model.semantic_ids.table import SemanticIdTable
from model.train.checkpoint import save_checkpoint, untrained_checkpoint


def build_run(sid: Path, data: str, run_dir: Path, max_history: int = 20, seed: int = 0) -> Path:
    table = SemanticIdTable.load(sid)
    dataset = load_dataset(data, max_history=max_history)
    table.check_catalog(dataset.item_ids)
    torch.manual_seed(seed)
    cfg = FAIRConfig(num_levels=table.code_length, codebook_size=table.codebook_size)
    model = FAIR(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    table.save(run_dir / "semantic_ids.npz")
    popular = np.argsort(-dataset.item_popularity(), kind="stable").astype(np.int64)
    np.save(run_dir / "popular.npy", popular)
    save_checkpoint(
        run_dir / "best.pt",
        untrained_checkpoint(
            model.state_dict(),
            cfg.to_dict(),
            table.sha256(),
            {"max_history": max_history, "note": "untrained, for the load benchmark"},
            dataset.fingerprint(),
        ),
    )
    return run_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sid", type=Path, default=Path("runs/sid/beauty_rqvae.npz"))
    p.add_argument("--data", default="../shared/data/amazon/Beauty")
    p.add_argument(
        "--out", type=Path, default=Path("runs/load-bench"), help="work dir: run/ and bundles/ go here"
    )
    p.add_argument("--run", type=Path, help="export this (trained) run instead of building an untrained one")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run = args.run or build_run(args.sid, args.data, args.out / "run")
    rc = export_main(
        ["--run", str(run), "--out", str(args.out / "bundles"), "--name", "beauty", "--users", "64"]
    )
    if rc == 0:
        print(f"bundle: {args.out / 'bundles' / 'beauty'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
