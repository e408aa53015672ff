"""``fair-eval``: leave-one-out Recall/NDCG of a trained run, or of the popularity baseline.

    fair-eval --run RUN_DIR --data DIR [--split valid|test] [--search exact|beam] [--beam 200] [--k 10] [--json]
    fair-eval --baseline popularity --data DIR [--split test] [--json]
    fair-eval ... --users 5000 [--sample-seed 0]     # a seeded sample of the split's users (large sets)

Full ranking over the whole catalog: the model's items come from the same search the service runs
(exact scoring of every item, or beam candidates rescored by the same score), seen items excluded, and the invalid-ID rate is measured on what comes back. With
``--json`` the last line printed is one JSON object (recall@5, recall@10, ndcg@5, ndcg@10,
invalid_rate, users, split, seconds, ...), so scripts can ``tail -n 1``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from model.data.dataset import DEFAULT_MAX_HISTORY, DataFormatError, SequenceDataset
from model.data.loading import load_dataset
from model.evaluate.metrics import evaluation_report
from model.evaluate.popularity import popularity_order, rank_by_popularity
from model.search.modes.flags import add_search_arguments, search_settings
from model.search.modes.registry import make_mode
from model.semantic_ids.table import SemanticIdError
from model.semantic_ids.trie import TrieError

PROG = "fair-eval"
EPILOG = """examples:
  fair-eval --run runs/beauty_fair --data ../shared/data/amazon/Beauty --json
  fair-eval --run runs/beauty_fair --data ../shared/data/amazon/Beauty --split valid --checkpoint latest
  fair-eval --baseline popularity --data ../shared/data/amazon/Beauty --json
  fair-eval --run runs/beauty_1m --data runs/expand/beauty_1m --users 5000 --json   # 1M items: a sample
"""
REPORT_KEYS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "invalid_rate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Leave-one-out evaluation (full ranking, Recall/NDCG@5/10, invalid-ID rate) of a "
        "fair-train run, or of the popularity baseline.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--run", type=Path, help="fair-train run directory (best.pt/checkpoint.pt, semantic_ids.npz)"
    )
    what.add_argument("--baseline", choices=["popularity"], help="evaluate a baseline instead of a run")
    p.add_argument(
        "--data",
        required=True,
        help="dataset the run was trained on: a folder fair-train reads, or synthetic:...",
    )
    p.add_argument(
        "--split", choices=["valid", "test"], default="test", help="leave-one-out split (default test)"
    )
    add_search_arguments(
        p,
        default="exact",
        intro="the served search",
        flags={"candidates": "--beam"},  # fair-eval's spelling of the beam's candidates
    )
    p.add_argument("--k", type=int, default=10, help="items ranked per user, >= 10 (default 10)")
    p.add_argument("--batch-size", type=int, default=256, help="users per forward pass (default 256)")
    p.add_argument(
        "--users",
        type=int,
        default=None,
        help="evaluate a seeded sample of this many users of the split (default: all); a run and the "
        "popularity baseline given the same --users and --sample-seed see the same users",
    )
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the --users sample (default 0)")
    p.add_argument(
        "--checkpoint", choices=["best", "latest"], default="best", help="best.pt or checkpoint.pt"
    )
    p.add_argument(
        "--max-history", type=int, default=None, help="history items per user (default: the run's)"
    )
    p.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    p.add_argument("--json", action="store_true", help="end the output with one JSON line")
    return p


def load_data(path: str | Path, max_history: int) -> SequenceDataset:
    """The dataset to evaluate on (any format ``fair-train`` reads), histories cut to ``max_history`` items."""
    return load_dataset(path, max_history=max_history)


def evaluate_popularity(
    dataset: SequenceDataset, split: str, k: int, users: int | None = None, sample_seed: int = 0
) -> dict:
    """Popularity baseline: training counts, seen items excluded, scored like a model."""
    ev = dataset.eval_split(split).sample(users, sample_seed)
    ranked = rank_by_popularity(popularity_order(dataset.item_popularity()), ev.histories, k=k)
    return evaluation_report(ranked, ev.targets, dataset.num_items, exclude=ev.histories)


def evaluate_model(args: argparse.Namespace) -> tuple[dict, dict]:
    """Load the run and the data, check they belong together, rank the split. -> (report, context)."""
    from model.evaluate.ranking import evaluate_run, load_run  # torch only on this path

    run = load_run(args.run, args.checkpoint, args.device)
    max_history = args.max_history or run.max_history(DEFAULT_MAX_HISTORY)
    dataset = load_data(args.data, max_history)
    run.table.check_catalog(dataset.item_ids, what=f"dataset {args.data}")
    recorded = run.checkpoint.get("data_fingerprint")
    if recorded and recorded != dataset.fingerprint():
        print(
            f"{PROG}: warning: {args.data} differs from the data {run.checkpoint_path} was trained on",
            file=sys.stderr,
        )
    ev = dataset.eval_split(args.split).sample(args.users, args.sample_seed)
    mode = make_mode(args.search, search_settings(args))
    report = evaluate_run(
        run,
        ev.histories,
        ev.targets,
        user_ids=[dataset.user_ids[u] for u in ev.users] if run.user_buckets else None,
        search_mode=mode,
        k=args.k,
        batch_size=args.batch_size,
        device=args.device,
        max_history=max_history,
        progress=sys.stderr.isatty(),
    )
    context = {
        "model": f"{run.path} ({run.checkpoint_path.name}, step {run.checkpoint.get('step', '?')})",
        "attention": getattr(run.model.cfg, "attention", "?"),
        "search": mode.describe(),
        "max_history": max_history,
    }
    return report, context


def format_table(report: dict, context: dict) -> str:
    lines = [f"{key:<14}{value}" for key, value in context.items()]
    lines.append("")
    lines += [f"{key:<14}{report[key]:.4f}" for key in REPORT_KEYS]
    lines.append(f"{'users':<14}{report['users']}")
    lines.append(f"{'seconds':<14}{report['seconds']:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.k < 10:
        parser.error(f"--k must be >= 10 to report @10 metrics, got {args.k}")
    try:
        make_mode(args.search, search_settings(args)).check_k(args.k)
    except ValueError as exc:
        parser.error(f"--search {args.search}: {exc}")
    if args.batch_size < 1 or (args.max_history is not None and args.max_history < 1):
        parser.error("--batch-size and --max-history must be >= 1")
    if args.users is not None and args.users < 1:
        parser.error(f"--users must be >= 1, got {args.users}")
    start = time.perf_counter()
    try:
        if args.baseline:
            dataset = load_data(args.data, args.max_history or DEFAULT_MAX_HISTORY)
            report = evaluate_popularity(dataset, args.split, args.k, args.users, args.sample_seed)
            context = {"model": "popularity baseline (training counts, seen items excluded)"}
        else:
            report, context = evaluate_model(args)
    except (DataFormatError, SemanticIdError, TrieError, ValueError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    report["seconds"] = round(time.perf_counter() - start, 3)
    context = {"data": str(args.data), "split": args.split, **context}
    print(format_table(report, context))
    if args.json:
        out = {key: report[key] for key in REPORT_KEYS}
        out.update(users=report["users"], split=args.split, seconds=report["seconds"])
        out.update({k: v for k, v in context.items() if k not in out})
        print(json.dumps(out, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
