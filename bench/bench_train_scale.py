"""Training at catalog scale: sequences/s, peak RSS and minutes per epoch, full vs sampled softmax.

    .venv/bin/python bench/bench_train_scale.py \\
        --case ../shared/data/amazon/Beauty:full,sampled \\
        --case runs/expand/beauty_100k:full,sampled --case runs/expand/beauty_1m:sampled --json

Every case (dataset x softmax form) runs in its own process, so its peak RSS (``ru_maxrss``) is its
own: loading the data, the ``Trainer`` (network, AdamW state, training windows) and the timed steps.
The steps are ``Trainer.train_step``, the very step ``fit`` takes (forward, every loss term of the
config, backward, clipping, AdamW), on the first batches of epoch 0 after ``--warmup`` untimed ones;
no validation, no checkpoint. Minutes per epoch = training windows / (sequences/s) / 60.

Semantic IDs: the expanded catalogs have no semantic-ID table, so every case gives its items RANDOM
distinct codes (L=4, V=256, seeded) made here: the step's cost does not depend on which codes an item
has, only on L, V and the catalog size. The ID table starts random (``train.item_id_init = "random"``:
the text start needs text embeddings, which cost the same to train from).

``opt_step_s`` times ``optimizer.step()`` alone (AdamW over every parameter, the dense [I, D] ID table
and its two moment tables included) on the last step's gradients; ``adam_state_mb`` is the size of
those moments. One torch thread by default: other jobs share the machine's cores. The last line with
``--json`` is every case's record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(ROOT))

from report import print_records  # noqa: E402  (bench/report.py: the script's folder is on sys.path)

from model.data.loading import load_dataset  # noqa: E402
from model.semantic_ids.table import SemanticIdTable  # noqa: E402
from model.train.batches import collate, epoch_batches  # noqa: E402
from model.train.config import TrainConfig, load_config  # noqa: E402
from model.train.trainer import Trainer  # noqa: E402

FORMS = ("full", "sampled")


def random_codes(num_items: int, seed: int = 0) -> np.ndarray:
    """[I, 4] distinct random codes over V = 256 (the bench's stand-in semantic IDs)."""
    rng = np.random.default_rng(seed)
    flat = rng.choice(256**3, size=num_items, replace=False)
    levels = [(flat // 256**p) % 256 for p in (2, 1, 0)]
    return np.stack([*levels, rng.integers(0, 256, num_items)], axis=1).astype(np.int64)


def measure(data_path: str, form: str, args: argparse.Namespace) -> dict:
    """One case, in this process: load, build the trainer, time the steps."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load_dataset(data_path)
    table = SemanticIdTable(data.item_ids, random_codes(data.num_items), 256)
    load_s = time.perf_counter() - t0
    sets = [f"train.softmax={form}", f"train.num_negatives={args.num_negatives}",
            f"train.negative_sampler={args.sampler}", "train.item_id_init=random",
            "train.budget_minutes=0", *args.set]  # fmt: skip
    cfg = load_config(args.config, sets)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        trainer = Trainer(cfg, data, table, Path(out) / "run", progress=False)
        build_s = time.perf_counter() - t0
        batches = epoch_batches(trainer.windows, cfg.train.batch_size, 0, 0)[: args.warmup + args.steps]
        trainer.model.train()
        for index in batches[: args.warmup]:
            trainer.train_step(collate(trainer.windows, index, trainer.item_codes))
        seqs, t0 = 0, time.perf_counter()
        for index in batches[args.warmup :]:
            trainer.train_step(collate(trainer.windows, index, trainer.item_codes))
            seqs += len(index)
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(3):
            trainer.optimizer.step()
        opt_s = (time.perf_counter() - t0) / 3
        state = [st for opt in trainer.optimizer.optimizers for st in opt.state.values()]
        adam_bytes = sum(
            v.numel() * v.element_size()
            for st in state
            for v in st.values()
            if torch.is_tensor(v) and v.ndim > 0
        )
        windows = len(trainer.windows.seq)
    seq_per_s = seqs / seconds
    return {
        "data": Path(data_path).name, "items": data.num_items, "users": len(data.user_ids),
        "softmax": form, "num_negatives": args.num_negatives if form == "sampled" else None,
        "threads": args.threads, "steps": args.steps, "batch_size": cfg.train.batch_size,
        "seq_per_s": round(seq_per_s, 1), "s_per_step": round(seconds / args.steps, 3),
        "opt_step_s": round(opt_s, 3), "adam_state_mb": round(adam_bytes / 2**20),
        "windows_per_epoch": windows, "min_per_epoch": round(windows / seq_per_s / 60, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "load_s": round(load_s, 1), "build_s": round(build_s, 1),
    }  # fmt: skip


def cpu_name() -> str:
    """The CPU model (lscpu's "Model name"), with the core count."""
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]  # fmt: skip
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def parse_case(text: str) -> tuple[str, list[str]]:
    path, _, forms = text.rpartition(":")
    if not path or not forms or any(f not in FORMS for f in forms.split(",")):
        raise argparse.ArgumentTypeError(f"--case {text!r}: expected DATA:full,sampled")
    return path, forms.split(",")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", type=parse_case, action="append", required=True, help="DATA:form[,form]")
    p.add_argument("--config", default=str(ROOT / "configs/amazon.toml"))
    p.add_argument("--set", action="append", default=[], help="--set override for every case")
    p.add_argument(
        "--num-negatives",
        type=int,
        default=TrainConfig().num_negatives,
        help="sampled softmax negatives per batch (default: the config default, %(default)s)",
    )
    p.add_argument("--sampler", default="popularity", choices=("uniform", "popularity"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one case, one form
    p.add_argument("--json", action="store_true", help="print every record as one JSON list, last line")
    args = p.parse_args(argv)
    if args.one:
        ((path, (form,)),) = args.case
        print(json.dumps(measure(path, form, args)))
        return 0
    records = []
    for path, forms in args.case:
        for form in forms:
            child = [sys.executable, __file__, "--one", "--case", f"{path}:{form}", "--config", args.config,
                     "--num-negatives", str(args.num_negatives), "--sampler", args.sampler,
                     "--threads", str(args.threads), "--warmup", str(args.warmup), "--steps", str(args.steps),
                     *(a for s in args.set for a in ("--set", s))]  # fmt: skip
            done = subprocess.run(child, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                records.append({"data": Path(path).name, "softmax": form, "error": done.stderr[-300:]})
                continue
            rec = json.loads(done.stdout.strip().splitlines()[-1])
            rec["machine"] = cpu_name()
            records.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
    print_records(records, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
