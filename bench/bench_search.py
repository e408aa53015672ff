"""The served search, measured: quality against exact ranking on a trained run, and cost per user.

    .venv/bin/python bench/bench_search.py --run runs/quality/beauty_fair --data ../shared/data/amazon/Beauty
    .venv/bin/python bench/bench_search.py --synthetic-items 1000000          # cost only, 1M-item catalog

With ``--run``: the network is run once over the split's users; then every search (exact scoring of the
catalog, and the semantic-ID beam with N candidates rescored by the full score) ranks from the same
scores, so the rows differ only by the search. Reported: NDCG@10 / Recall@10, the share of exact
NDCG@10 kept, and milliseconds per user of the search alone at batch 1 and 32 (the service's batch
sizes), medians over repeats.

With ``--synthetic-items N``: a random catalog of N items (L=4 codes of 256, the collision level
sparse as in real tables) with D-dim item vectors and random network outputs: what each search costs
per user, and the memory of the item table, at a catalog size we have no data for.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import print_rows  # noqa: E402  (bench/report.py: the script's folder is on sys.path)

from model.evaluate.metrics import recall_ndcg  # noqa: E402
from model.search.item_scores import ItemScorer  # noqa: E402
from model.search.modes.base import SearchConfigError, SearchMode  # noqa: E402
from model.search.modes.registry import make_mode, mode_names, mode_params  # noqa: E402
from model.semantic_ids.trie import CodeTrie  # noqa: E402


def per_user_ms(fn, batch: int, users: int, repeats: int) -> float:
    """Median ms per user of ``fn(rows)`` over ``repeats`` passes of batches of ``batch`` users."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for start in range(0, users, batch):
            fn(slice(start, min(start + batch, users)))
        times.append((time.perf_counter() - t0) / users)
    return 1000 * float(np.median(times))


def run_scores(run_dir: Path, data: str, split: str, limit: int | None):
    import torch

    from model.data.loading import load_dataset
    from model.evaluate.ranking import item_scorer, load_run
    from model.search.inputs import histories_to_inputs

    run = load_run(run_dir)
    max_history = run.max_history(20)
    dataset = load_dataset(data, max_history=max_history)
    ev = dataset.eval_split(split)
    keep = [i for i, h in enumerate(ev.histories) if len(h)][:limit]
    hist = [ev.histories[i] for i in keep]
    cs, qs = [], []
    with torch.no_grad():
        for start in range(0, len(hist), 256):
            inputs = histories_to_inputs(hist[start : start + 256], run.table.codes, max_history)
            c, q = run.model.next_item_scores(*(torch.from_numpy(a) for a in inputs))
            cs.append(c.numpy())
            qs.append(q.numpy())
    return (
        item_scorer(run.model, run.table),
        run.trie,
        np.concatenate(cs),
        np.concatenate(qs),
        hist,
        ev.targets[keep],
    )


def synthetic(items: int, dim: int, users: int, seed: int):
    rng = np.random.default_rng(seed)
    L, V = 4, 256
    codes = rng.integers(0, V, (items, L - 1))
    codes = np.concatenate([codes, np.zeros((items, 1), np.int64)], 1)
    order = np.lexsort(codes[:, ::-1].T)  # separate collisions as the real tables do
    sorted_codes = codes[order]
    same = np.r_[False, (sorted_codes[1:, :3] == sorted_codes[:-1, :3]).all(1)]
    run = np.zeros(items, np.int64)
    for i in np.flatnonzero(same):
        run[i] = run[i - 1] + 1
    sorted_codes[:, 3] = run
    codes = sorted_codes[np.argsort(order)]
    keep = codes[:, 3] < V
    codes = codes[keep]
    vectors = (rng.standard_normal((len(codes), dim)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(len(codes)).astype(np.float32)
    scorer = ItemScorer(codes, vectors, bias)
    trie = CodeTrie.from_codes(codes, V)
    cs = (rng.standard_normal((users, L, V)) * 2).astype(np.float32)
    qs = rng.standard_normal((users, dim)).astype(np.float32)
    hist = [rng.choice(len(codes), 8, replace=False) for _ in range(users)]
    return scorer, trie, cs, qs, hist


def configurations(values: list[int]) -> list[SearchMode]:
    """Every registered mode, once per swept value of its parameters (once when it has none), in
    registration order: the rows of the table (the first, exact, is the reference)."""
    out: list[SearchMode] = []
    for name in mode_names():
        for value in values:
            mode = make_mode(name, {p.name: value for p in mode_params()})
            if mode not in out:
                out.append(mode)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", type=Path, help="fair-train run directory")
    what.add_argument("--synthetic-items", type=int, help="cost on a random catalog of this many items")
    p.add_argument("--data", help="dataset of --run")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--limit", type=int, help="at most this many users (default all)")
    p.add_argument(
        "--candidates",
        type=int,
        nargs="+",
        default=[20, 50, 100, 200, 500],
        help="values swept for every search parameter (the beam's candidates); a mode without "
        "parameters runs once",
    )
    p.add_argument("--dim", type=int, default=64, help="item vector width for --synthetic-items")
    p.add_argument("--timing-users", type=int, default=256, help="users timed per search (default 256)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    if args.run:
        if not args.data:
            p.error("--run needs --data")
        scorer, trie, cs, qs, hist, targets = run_scores(args.run, args.data, args.split, args.limit)
        where = f"{args.run} on {args.split} of {args.data}, {len(hist)} users"
    else:
        scorer, trie, cs, qs, hist = synthetic(args.synthetic_items, args.dim, args.timing_users, 0)
        targets = None
        where = f"synthetic catalog of {scorer.num_items:,} items, D={args.dim}, random scores"
    rows = []
    t_users = min(args.timing_users, len(hist))
    for mode in configurations(args.candidates):
        row = {"search": mode.describe()}
        wide = mode.at_least(10)
        try:  # this bench ranks with the unfolded ItemScorer; ann needs the folded table
            wide.search(scorer, trie, (cs[:1], qs[:1]), 10, hist[:1])
        except SearchConfigError as exc:
            print(
                f"skipped {row['search']}: {exc} (bench/bench_catalog_scale.py measures it)", file=sys.stderr
            )
            continue
        if targets is not None:
            items = np.concatenate(
                [
                    wide.search(scorer, trie, (cs[s : s + 256], qs[s : s + 256]), 10, hist[s : s + 256]).items
                    for s in range(0, len(hist), 256)
                ]
            )
            row.update({k: round(v, 4) for k, v in recall_ndcg(items, targets, ks=(10,)).items()})
        for batch in (1, 32):

            def one(rows_, wide=wide):
                wide.search(scorer, trie, (cs[rows_], qs[rows_]), 10, hist[rows_])

            row[f"ms/user @{batch}"] = round(per_user_ms(one, batch, t_users, args.repeats), 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    if targets is not None:
        exact = rows[0]["ndcg@10"]
        for row in rows:
            row["of exact NDCG@10"] = f"{row['ndcg@10'] / exact:.1%}" if exact else "-"
    vec_mb = 0 if scorer.vectors is None else scorer.vectors.nbytes / 2**20
    print_rows(rows, f"{where}; item table {vec_mb:.0f} MiB", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
