"""Noise-injection experiment: metric drop when n random items are inserted into each test history.

    .venv/bin/python bench/noise_experiment.py --run runs/beauty-fair runs/beauty-standard \
        --data ../shared/data/amazon/Beauty --n 1 2 5 [--seed 0] [--out noise.md]

Evaluates every run on the clean test histories and on the same histories with n random catalog
items inserted (see ``model/evaluate/noise.py`` for exactly how), through the same ranking code as
``fair-eval``, and prints one markdown table: metrics per n and the relative drop against clean.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from model.data.dataset import DEFAULT_MAX_HISTORY, DataFormatError  # noqa: E402
from model.evaluate.cli import load_data  # noqa: E402
from model.evaluate.noise import noise_experiment, noise_markdown  # noqa: E402
from model.evaluate.ranking import EvaluationError, evaluate_run, load_run  # noqa: E402
from model.search.modes.flags import add_search_arguments, search_settings  # noqa: E402
from model.search.modes.registry import make_mode  # noqa: E402
from model.semantic_ids.table import SemanticIdError  # noqa: E402

PROG = "noise_experiment"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, nargs="+", required=True, help="fair-train run directories")
    p.add_argument("--data", required=True, help="dataset folder the runs were trained on")
    p.add_argument(
        "--n", type=int, nargs="+", default=[1, 2, 5], help="noise items per history (default 1 2 5)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default 0)")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    add_search_arguments(p, default="exact", intro="the served search", flags={"candidates": "--beam"})
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="also write the markdown table to this file")
    return p


def run_one(run_dir: Path, args: argparse.Namespace) -> list[dict]:
    run = load_run(run_dir, args.checkpoint, args.device)
    max_history = run.max_history(DEFAULT_MAX_HISTORY)
    dataset = load_data(args.data, max_history)
    run.table.check_catalog(dataset.item_ids, what=f"dataset {args.data}")
    split = dataset.eval_split(args.split)
    users = [dataset.user_ids[u] for u in split.users] if run.user_buckets else None
    label = f"{run_dir.name} ({run.model.cfg.attention})"

    def evaluate(histories):
        return evaluate_run(
            run,
            histories,
            split.targets,
            user_ids=users,
            search_mode=make_mode(args.search, search_settings(args)),
            batch_size=args.batch_size,
            device=args.device,
            max_history=max_history,
            progress=sys.stderr.isatty(),
        )

    return noise_experiment(
        evaluate, split.histories, split.targets, dataset.num_items, args.n, max_history, args.seed, label
    )


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.n):
        parser.error("--n values must be >= 1")
    start = time.perf_counter()
    rows: list[dict] = []
    try:
        for run_dir in args.run:
            rows += run_one(run_dir, args)
    except (EvaluationError, SemanticIdError, DataFormatError, ValueError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    table = noise_markdown(rows)
    footer = (
        f"\n\n{args.split} split of {args.data}, {rows[0]['users']} users, search {make_mode(args.search, search_settings(args)).describe()}, "
        f"noise seed {args.seed}, {time.perf_counter() - start:.0f} s"
    )
    print(table + footer)
    if args.out:
        write_atomic(args.out, table + footer + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
