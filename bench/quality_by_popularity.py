"""Test NDCG@10 of trained runs, split by how popular each user's test item was in training.

Every test user is ranked as ``fair-eval --split test`` ranks (exact search, seen items excluded, the
run's own history length; user-token models are not supported), then users are grouped by the number of times their test item occurs in the training part
of the sequences (all but each user's last two items). It shows where a model's NDCG comes from, and
which items a change helps: the long tail (few training interactions) or the popular head.

    .venv/bin/python bench/quality_by_popularity.py --data ../shared/data/amazon/Beauty \\
        --run runs/quality_text/beauty_fair runs/quality2000/beauty_fair
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from model.data.dataset import DEFAULT_MAX_HISTORY
from model.data.loading import load_dataset
from model.evaluate.ranking import load_run, rank_items

EDGES = (0, 3, 6, 11, 31)  # buckets [0,2], [3,5], [6,10], [11,30], [31, inf)


def bucket_names(edges: tuple[int, ...] = EDGES) -> list[str]:
    names = [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:], strict=False)]
    return [*names, f">{edges[-1] - 1}"]


def training_counts(sequences: list[np.ndarray], num_items: int) -> np.ndarray:
    """[items] occurrences in the training part of every sequence (the last two items held out)."""
    parts = [np.asarray(s[:-2], dtype=np.int64) for s in sequences if len(s) > 2]
    return np.bincount(np.concatenate(parts), minlength=num_items) if parts else np.zeros(num_items, int)


def ndcg_at_10(items: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """[users] NDCG@10 of one held-out target per user (0 when it is not in the top 10)."""
    hit = items[:, :10] == targets[:, None]
    rank = hit.argmax(1)
    return np.where(hit.any(1), 1.0 / np.log2(rank + 2.0), 0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset folder the runs were trained on")
    p.add_argument("--run", nargs="+", required=True, help="fair-train run directories (best.pt)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    datasets: dict[int, object] = {}  # one load per history length the runs were trained with
    header = False
    for path in args.run:
        run = load_run(path)
        if run.user_buckets:
            print(f"{path}: user-token models are not supported here (use fair-eval)", file=sys.stderr)
            return 2
        max_history = run.max_history(DEFAULT_MAX_HISTORY)
        if max_history not in datasets:
            datasets[max_history] = load_dataset(args.data, max_history=max_history)
        data = datasets[max_history]
        run.table.check_catalog(data.item_ids, what=f"dataset {args.data}")
        split = data.eval_split("test")
        counts = training_counts(data.sequences, data.num_items)[split.targets]
        bucket = np.searchsorted(np.asarray(EDGES), counts, side="right") - 1
        names = bucket_names()
        if not header:
            print("| model | " + " | ".join(names) + " | all |")
            print("|---|" + "---:|" * (len(names) + 1))
            shares = " | ".join(f"{(bucket == b).mean():.1%}" for b in range(len(names)))
            print(f"| share of test users | {shares} | |")
            header = True
        items, _ = rank_items(run.model, run.table, run.trie, split.histories, k=10, max_history=max_history)
        ndcg = ndcg_at_10(items, split.targets)
        cells = " | ".join(
            f"{ndcg[bucket == b].mean():.4f}" if (bucket == b).any() else "" for b in range(len(names))
        )
        print(f"| {path} | {cells} | {ndcg.mean():.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
