"""The served search at catalog scale: ``ann`` (faiss IVF-Flat over the folded table) against ``exact``.

    .venv/bin/python bench/bench_catalog_scale.py --items 1000000 --synthetic --json [--work DIR]
    .venv/bin/python bench/bench_catalog_scale.py --items 100000 --synthetic --json

A model trained on Beauty (``--run``, default runs/quality/beauty_fair_s1) is folded (``export.fold``:
``score(i) = h . v_i + c_i``). With ``--synthetic`` its folded table ``[v, c]`` is grown to ``--items``
the way ``fair-data expand`` grows a catalog (``model.data.expand``): each of the n source items gets
``K = ceil(items / n)`` copies (copy b of item i at index ``b * n + i``), and each copy is the source's
``[v_i, c_i]`` plus seeded Gaussian noise of ``--noise`` (default 0.2) times the table's per-column
standard deviation: variants of an item lie near it, as an expanded item's variants do, and a
catalog of near-duplicates is harder for an index than random vectors. Without ``--synthetic`` the
run's own catalog is measured (``--items`` must be its size).

Queries are REAL: ``--users`` (500) test histories of ``--data`` (Beauty) through the network's forward
pass -> ``h``. Ground truth is the exact top-10 by brute force (seen items excluded, as served). Timed,
one thread (one BLAS thread, ``faiss.omp_set_num_threads(1)``, as the service runs): ``ann`` at each
``--nprobe`` and ``exact``, at batch 1 and batch 32, milliseconds of search per user (the network's
forward pass is not included: it does not depend on the catalog). ``beam`` is not measured at scale:
the copies have no semantic IDs of their own (a new code table and retrained code heads would be a
different model), so a beam over the expanded catalog cannot be built from a folded table.

The expanded table and the index are cached under ``--work`` (default runs/catalog_scale, keyed by
items, noise, seed and nlist). The last line with ``--json`` is one JSON object: ``items``, ``search``
(the served configuration: ann at the default nprobe), ``recall10_vs_exact``, ``ms_per_user_b1``,
``ms_per_user_b32``, ``index_build_s``, ``peak_rss_mb`` and ``rows`` (one per mode and nprobe).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.search.folded import CodeHeads, FoldedScorer  # noqa: E402
from model.search.modes.ann import (  # noqa: E402
    DEFAULT_NPROBE,
    AnnMode,
    attach_index,
    build_index,
    default_nlist,
    recall_at_k,
)
from model.search.modes.exact import ExactMode  # noqa: E402

K = 10
BATCHES = (1, 32)


def _log(msg: str) -> None:
    print(f"[catalog-scale] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def real_queries(run_dir: Path, data: str, users: int, seed: int):
    """(folded scorer of the run, h [U, D] of ``users`` real test histories, those histories)."""
    from export.fold import fold_item_scores
    from export.verify import sample_histories, scores_for, torch_fn
    from model.data.loading import load_dataset
    from model.evaluate.ranking import load_run

    run = load_run(run_dir)
    max_history = int((run.checkpoint.get("train_config") or {}).get("max_history", 20))
    dataset = load_dataset(data, max_history=max_history)
    run.table.check_catalog(dataset.item_ids, what=f"dataset {data}")
    histories = sample_histories(dataset.eval_split("test").histories, users, seed)
    codes = np.asarray(run.table.codes, dtype=np.int64)
    folded = fold_item_scores(run.model.eval(), codes)
    h = scores_for(torch_fn(run.model), histories, codes, max_history)["history"]
    return folded, h, histories


def expand_table(
    folded: FoldedScorer, items: int, noise: float, seed: int, work: Path
) -> tuple[np.ndarray, np.ndarray]:
    """The folded ``[v, c]`` grown to ``K * n >= items`` noisy copies (module docstring), cached."""
    n = folded.num_items
    copies = math.ceil(items / n)
    stem = work / f"table_{copies * n}_noise{noise:g}_seed{seed}"
    if Path(f"{stem}.table.npy").is_file():
        _log(f"expanded table from {stem}.*.npy")
        return np.load(f"{stem}.table.npy", mmap_mode="r")[:], np.load(f"{stem}.bias.npy")
    source = np.concatenate([folded.table, folded.bias[:, None]], axis=1)  # [n, D + 1]
    scale = noise * source.std(axis=0)
    out = np.empty((copies * n, source.shape[1]), dtype=np.float32)
    for b in range(copies):  # copy-major: copy b of item i is row b * n + i
        rng = np.random.default_rng([seed, b])
        out[b * n : (b + 1) * n] = source + rng.standard_normal(source.shape, dtype=np.float32) * scale
    table, bias = np.ascontiguousarray(out[:, :-1]), np.ascontiguousarray(out[:, -1])
    del out
    work.mkdir(parents=True, exist_ok=True)
    np.save(f"{stem}.table.npy", table)
    np.save(f"{stem}.bias.npy", bias)
    return table, bias


def load_or_build_index(scorer: FoldedScorer, nlist: int, tag: str, work: Path) -> tuple[object, float]:
    """The IVF index of ``scorer`` (cached under ``work``) and the seconds its build took."""
    import faiss

    path = work / f"ann_{tag}_nlist{nlist}.faiss"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        _log(f"index from {path}")
        return faiss.read_index(str(path)), float(json.loads(meta.read_text())["build_seconds"])
    _log(f"building IVF{nlist}-Flat (inner product) over {scorer.num_items:,} x {scorer.dim + 1} ...")
    index, info = build_index(scorer.table, scorer.bias, nlist)
    _log(f"built in {info['build_seconds']:.1f}s")
    work.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))
    meta.write_text(json.dumps(info))
    return index, float(info["build_seconds"])


def ms_per_user(mode, scorer, h, exclude, batch: int, users: int) -> tuple[float, np.ndarray]:
    """Milliseconds of ``mode``'s search per user over the first ``users`` users at ``batch``, and the
    items returned."""
    users = min(users, len(h))
    out = []
    start = time.perf_counter()
    for s in range(0, users, batch):
        out.append(mode.search(scorer, None, (h[s : s + batch],), K, exclude[s : s + batch]).items)
    seconds = time.perf_counter() - start
    return 1000 * seconds / users, np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000, help="catalog size (rounded up to K copies)")
    p.add_argument("--synthetic", action="store_true", help="grow the run's folded table to --items")
    p.add_argument("--run", type=Path, default=Path("runs/quality/beauty_fair_s1"))
    p.add_argument("--data", default="../shared/data/amazon/Beauty", help="the run's data: real histories")
    p.add_argument("--users", type=int, default=500, help="real test histories used as queries")
    p.add_argument("--exact-users", type=int, default=100, help="users timed for exact at batch 1")
    p.add_argument("--noise", type=float, default=0.2, help="copy noise, times each column's std")
    p.add_argument("--nprobe", type=int, nargs="+", default=[32, 64, 96, 128], help="nprobe values timed")
    p.add_argument("--nlist", type=int, default=None, help="inverted lists (default ~4 sqrt(items))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("runs/catalog_scale"), help="cache directory")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    args = p.parse_args(argv)

    import faiss

    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    folded, h, histories = real_queries(args.run, args.data, args.users, args.seed)
    _log(f"{len(histories)} real test histories -> h {h.shape} ({time.perf_counter() - t0:.1f}s)")
    if args.synthetic:
        table, bias = expand_table(folded, args.items, args.noise, args.seed, args.work)
        tag = f"{len(table)}_noise{args.noise:g}_seed{args.seed}"
    else:
        if args.items != folded.num_items:
            p.error(f"without --synthetic, --items must be the run's catalog size ({folded.num_items})")
        table, bias, tag = folded.table, folded.bias, f"run{folded.num_items}"
    n = len(table)
    heads = CodeHeads(np.zeros((table.shape[1], 1, 1), np.float32), np.zeros((1, 1), np.float32))
    scorer = FoldedScorer(np.zeros((n, 1), np.int64), table, bias, heads)  # codes unused by ann/exact
    exclude = list(histories)  # seen items (source indices = copy 0) are excluded, as served
    nlist = args.nlist or default_nlist(n)
    index, build_s = load_or_build_index(scorer, nlist, tag, args.work)
    attach_index(scorer, index)

    with threadpool_limits(limits=1, user_api="blas"):
        _log("exact top-10 (ground truth) ...")
        # in batches of 32: one [500, 1M] float32 score matrix would be 2 GB of the peak RSS
        _, truth = ms_per_user(ExactMode(), scorer, h, exclude, 32, len(h))
        rows = []
        exact_b1, _ = ms_per_user(ExactMode(), scorer, h, exclude, 1, args.exact_users)
        exact_b32, _ = ms_per_user(ExactMode(), scorer, h, exclude, 32, len(h))  # timed again, warm
        rows.append(
            {
                "mode": "exact",
                "recall10_vs_exact": 1.0,
                "ms_per_user_b1": exact_b1,
                "ms_per_user_b32": exact_b32,
            }
        )
        _log(f"exact: {exact_b1:.2f} ms/user at batch 1, {exact_b32:.2f} at batch 32")
        for nprobe in args.nprobe:
            mode = AnnMode(nprobe=nprobe)
            b1, got = ms_per_user(mode, scorer, h, exclude, 1, len(h))
            b32, got32 = ms_per_user(mode, scorer, h, exclude, 32, len(h))
            assert np.array_equal(got, got32), "batching changed the ann ranking"
            recall = recall_at_k(got, truth)
            rows.append({"mode": "ann", "nprobe": nprobe, "candidates": mode.candidates,
                         "recall10_vs_exact": recall, "ms_per_user_b1": b1, "ms_per_user_b32": b32})  # fmt: skip
            _log(f"ann nprobe {nprobe}: recall@10 {recall:.4f}, {b1:.3f} ms/user at batch 1, {b32:.3f} at 32")
    rows.append({"mode": "beam", "skipped": "the expanded copies have no semantic IDs of their own"})
    served = next(
        (r for r in rows if r.get("nprobe") == DEFAULT_NPROBE),
        next(r for r in rows if r["mode"] == "ann"),
    )
    result = {
        "items": n,
        "source_items": folded.num_items,
        "copies": n // folded.num_items if args.synthetic else 1,
        "noise": args.noise if args.synthetic else 0.0,
        "users": len(h),
        "search": {
            "mode": "ann",
            "nprobe": served["nprobe"],
            "candidates": served["candidates"],
            "index": f"IVF{nlist}-Flat inner product, dim {table.shape[1] + 1}",
        },  # fmt: skip
        "recall10_vs_exact": served["recall10_vs_exact"],
        "ms_per_user_b1": served["ms_per_user_b1"],
        "ms_per_user_b32": served["ms_per_user_b32"],
        "index_build_s": build_s,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
