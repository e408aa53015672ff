"""Training throughput (sequences/s) of whole optimisation steps on real data, per config and thread count.

    .venv/bin/python bench/bench_train_speed.py --data ../shared/data/amazon/Beauty \\
        --sid runs/quality/sid/beauty_rqvae.npz --configs configs/cpu_small.toml configs/fair_default.toml

Each case builds a ``Trainer`` (no validation), runs ``--warmup`` steps, then times ``--steps`` steps
(forward, every loss term, backward, clip, AdamW) on the first batches of epoch 0, so every case sees
the same batches. Cases run back to back in one process, so they share the machine's state; run it on
a quiet machine. With ``--profile`` the slowest operators of a few steps are printed too.

To measure another checkout (e.g. the code before a change) run this file with ``PYTHONPATH`` set to
that checkout: it only uses ``Trainer``, ``collate``, ``epoch_batches`` and ``load_config``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if not os.environ.get("PYTHONPATH"):  # PYTHONPATH may name another checkout to measure
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.data.loading import load_dataset  # noqa: E402
from model.semantic_ids.table import SemanticIdTable  # noqa: E402
from model.train.batches import collate, epoch_batches  # noqa: E402
from model.train.config import load_config  # noqa: E402
from model.train.optim import clip_grad_norm  # noqa: E402
from model.train.trainer import Trainer  # noqa: E402


def measure(config: str, sets: list[str], threads: int, data, table, warmup: int, steps: int, profile: bool):
    torch.set_num_threads(threads)
    cfg = load_config(config, ["train.budget_minutes=0", *sets])
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, data, table, out, progress=False)
        batches = epoch_batches(trainer.windows, cfg.train.batch_size, 0, 0)[: warmup + steps]
        trainer.model.train()

        def step(index) -> int:
            batch = collate(trainer.windows, index, trainer.item_codes)
            terms = trainer.losses(batch, trainer._seed_step())
            trainer.optimizer.zero_grad()
            terms["loss"].backward()
            clip_grad_norm(trainer.model.parameters(), cfg.train.grad_clip)
            trainer.optimizer.step()
            return len(index)

        for b in batches[:warmup]:
            step(b)
        t0, seqs = time.perf_counter(), 0
        for b in batches[warmup:]:
            seqs += step(b)
        seconds = time.perf_counter() - t0
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as prof

            with prof(activities=[ProfilerActivity.CPU]) as p:
                for b in batches[warmup : warmup + 5]:
                    step(b)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), file=sys.stderr)
    return {"config": Path(config).name, "set": " ".join(sets), "threads": threads,
            "seq_per_s": round(seqs / seconds, 1), "s_per_step": round(seconds / steps, 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--sid", required=True)
    p.add_argument("--configs", nargs="+", default=["configs/cpu_small.toml", "configs/fair_default.toml"])
    p.add_argument("--set", action="append", default=[], help="--set override for every case")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    data = load_dataset(args.data)
    table = SemanticIdTable.load(args.sid)
    rows = []
    import model

    print(f"measuring the code in {Path(model.__file__).resolve().parents[1]}", file=sys.stderr)
    for config in args.configs:
        for threads in args.threads:
            row = measure(config, args.set, threads, data, table, args.warmup, args.steps, args.profile)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
