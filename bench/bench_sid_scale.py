"""``fair-sid`` at catalog scale: text-embedding throughput, RQ k-means and RQ-VAE at 1M items, collisions,
and faiss k-means against ours.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_sid_scale.py --data runs/expand/beauty_1m \\
        --source ../shared/data/amazon/Beauty --threads 1 --json
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_sid_scale.py --data ../shared/data/amazon/Beauty \\
        --noise 0 --rqvae-epochs 50 --threads 1 --json       # Beauty itself: real embeddings, every epoch

``--data`` is a ``fair-data expand`` catalog (``model.data.expand``: ``K`` copies, "variants", of every
item of ``--source``, each with the source's text plus a ``variant`` number); ``--copies K`` keeps its
first ``K`` variants of every item (``--copies 1``: Beauty's size); a dataset that is not an expansion
(``--data`` = ``--source``) is measured as it is. Every stage runs in its own process, so each
``peak_rss_mb`` (``VmHWM``) is that stage's own; every stage uses ``--threads`` threads
(torch, BLAS, faiss). Each timing is given as wall seconds (``seconds``) and as the stage's CPU seconds
(``cpu_s``, ``time.process_time``): with one thread on a shared machine the CPU seconds are about what
the wall time would be on an idle core.

``embed``: the bundled MiniLM encoder (``SentenceTransformerEncoder``, at ``--batch-size``, default 64
as in ``fair-sid build``) on a seeded sample of ``--sample`` (5,000) item texts of the catalog, built as
``fair-sid build`` builds them (``load_dataset(...).item_texts()``); items/s, extrapolated to minutes for
the whole catalog. Model loading and one warm-up batch are not timed. The sample's real embeddings are
also compared with their source items' (``variant_shift``: how far the ``variant`` text moves a copy
from its source, and two sampled copies of one item from each other, against the Gaussian noise's).

The quantizers need embeddings of the whole catalog, and embedding a million texts on one CPU thread
takes hours, so they are made: the REAL MiniLM embeddings of the source items (``CachedEncoder``: read
from the embedding cache, or computed and cached) plus, per copy, seeded Gaussian noise of standard
deviation ``--noise`` per dimension, standing in for what the ``variant`` text does to an embedding.
The default 0.0043 puts two copies of an item
0.0043 * sqrt(2 * 384) = 0.119 apart (median), as the real variant texts of the 1M catalog do (0.120,
median over pairs of copies of one item in a 2,000-text sample; 0.094 on the 3-copy expansion, whose
variant numbers are one digit); the median distance from a Beauty item to its nearest other item is 0.52
(10% are below 0.30), so copies of an item stay nearer each other than to other items. The real variant
text also moves every copy in a common direction (a copy lies ~0.17 from its source, Gaussian noise puts
it 0.084 away), which moves the copies of an item together and which the noise does not model. The made
embeddings are cached under ``--work``.

``rqkmeans``: ``model.semantic_ids.build.quantize`` with ``fair-sid build``'s defaults (3 levels x 256
codes, 25 iterations, codebooks fitted on a 200k sample). ``rqvae``: the same with ``--rqvae-epochs``
epochs (default 2: the default 50 would take far more than 10 minutes at 1M; one epoch at 1M is
~980 AdamW steps, 2 epochs more steps than 50 epochs at Beauty's size take); the seconds of one epoch
(both timed epochs are reported) extrapolate to the default 50. Codes after 2 epochs are not converged
codes: their utilization and collisions are reported, marked with the epochs. For both: codebook
utilization per level, collisions (items in groups of equal tuples, groups, the largest group, groups
larger than the codebook) and whether ``add_collision_code`` raises ``CollisionError`` (a group larger
than the 256 codes the collision code can number): it is reported, never hidden.

``kmeans_ours`` / ``kmeans_faiss``: one k-means problem, level 1 of RQ k-means (the catalog's
embeddings, 256 centroids, ``--kmeans-iters`` = 25 iterations), fitted on all rows (or a seeded sample of
``--kmeans-fit-points``) by ``model.semantic_ids.rqkmeans.kmeans_reference`` (our numpy Lloyd loop,
k-means++ seeding, may stop early: iterations run are counted; ``rqkmeans.kmeans`` now runs faiss's
Lloyd iterations from those seeds, which is what ``kmeans_faiss_pp`` measures) and by ``faiss.Kmeans`` (random seeding, exactly ``niter`` iterations,
``max_points_per_centroid`` raised so faiss uses every row). ``kmeans_faiss_sub``: faiss with its
default subsampling (256 points per centroid, 65,536 rows). ``kmeans_faiss_pp``: faiss's Lloyd
iterations started from our k-means++ seeds (``rqkmeans._kmeans_pp``, drawn as ``kmeans`` draws them;
seeding included in the time, also reported alone). Error = mean squared residual of every row
to its nearest centroid (computed the same way for all three).

The last line with ``--json`` is one JSON object: the run's settings, the machine, the load average
before and after, and ``stages`` (one record per stage).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(ROOT))

from report import print_records  # noqa: E402  (bench/report.py: the script's folder is on sys.path)

STAGES = ("embed", "rqkmeans", "rqvae", "kmeans_ours", "kmeans_faiss", "kmeans_faiss_sub", "kmeans_faiss_pp")


def _log(msg: str) -> None:
    print(f"[sid-scale] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> int:
    """This process's peak RSS: ``VmHWM`` (``ru_maxrss`` would carry the parent's peak over the exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)  # kB
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB


def cpu_name() -> str:
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]  # fmt: skip
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def set_threads(threads: int) -> None:
    """One limit for every library a stage uses (torch, numpy's BLAS, faiss)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


# ---- the catalog ------------------------------------------------------------------------------------
def catalog_rows(data: str, copies: int | None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(source item id, variant) of every catalog item, read from items.tsv.gz as ``fair-sid expand`` reads
    it (a dataset that is not an expansion: every item is variant 0 of itself); with ``copies`` only the items of variant < copies. Returns (source ids, variants, kept rows)."""
    from model.data.benchmark import ITEMS_FILE, read_items_table
    from model.data.expand import SOURCE_COLUMN, VARIANT_COLUMN

    items = Path(data) / ITEMS_FILE
    _, fields, meta = read_items_table(items) if items.is_file() else (None, {}, {})
    if VARIANT_COLUMN not in fields or SOURCE_COLUMN not in meta:  # not expanded: every item is its own
        from model.data.loading import load_dataset

        ids = load_dataset(data).item_ids
        return ids, np.zeros(len(ids), dtype=np.int64), np.arange(len(ids))
    variants = np.array([int(v) for v in fields[VARIANT_COLUMN]], dtype=np.int64)
    keep = np.flatnonzero(variants < copies) if copies else np.arange(len(variants))
    sources = meta[SOURCE_COLUMN]
    return [sources[i] for i in keep], variants[keep], keep


def source_embeddings(source: str, batch_size: int) -> tuple[np.ndarray, dict[str, int], str, bool]:
    """The source dataset's real MiniLM embeddings through the project's cache (as ``fair-sid build``)."""
    from model.data.loading import load_dataset
    from model.semantic_ids.encoders import CachedEncoder, SentenceTransformerEncoder

    ds = load_dataset(source)
    enc = CachedEncoder(SentenceTransformerEncoder(batch_size=batch_size, progress=False))
    emb = enc.encode(ds.item_texts())
    return emb, ds.item_index(), ds.fingerprint(), bool(enc.last_hit)


def made_embeddings(args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """The catalog's embeddings (source's real ones + per-copy noise) and each row's source index, cached
    under ``--work``: (embeddings .npy, source index .npy, facts)."""
    tag = f"{Path(args.data).name}_c{args.copies or 'all'}_noise{args.noise:g}_seed{args.seed}"
    emb_path, src_path = args.work / f"emb_{tag}.npy", args.work / f"src_{tag}.npy"
    info_path = args.work / f"emb_{tag}.json"
    if emb_path.is_file() and src_path.is_file() and info_path.is_file():
        _log(f"embeddings from {emb_path}")
        return emb_path, src_path, json.loads(info_path.read_text())
    t0 = time.perf_counter()
    sources, variants, _ = catalog_rows(args.data, args.copies)
    real, index, fingerprint, hit = source_embeddings(args.source, args.batch_size)
    plan = Path(args.data) / "expansion.json"
    if plan.is_file():
        expected = json.loads(plan.read_text()).get("source_fingerprint")
        if expected and expected != fingerprint:
            raise SystemExit(f"{args.source} is not the source {args.data} was expanded from (fingerprint)")
    src = np.array([index[s] for s in sources], dtype=np.int64)
    out = np.empty((len(src), real.shape[1]), dtype=np.float32)
    chunk = 65536
    for k, s in enumerate(range(0, len(src), chunk)):
        rng = np.random.default_rng([args.seed, k])
        rows = src[s : s + chunk]
        out[s : s + chunk] = real[rows] + args.noise * rng.standard_normal(
            (len(rows), real.shape[1]), np.float32
        )
    args.work.mkdir(parents=True, exist_ok=True)
    np.save(emb_path, out)
    np.save(src_path, src)
    info = {"items": len(src), "source_items": len(real), "copies": int(variants.max()) + 1,
            "dim": int(real.shape[1]), "noise": args.noise, "source_cache_hit": hit,
            "make_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    info_path.write_text(json.dumps(info))
    return emb_path, src_path, info


# ---- the stages (each in its own process) -------------------------------------------------------------
def stage_embed(args: argparse.Namespace) -> dict:
    """MiniLM throughput on a seeded sample of the catalog's real item texts."""
    from model.data.loading import load_dataset
    from model.semantic_ids.encoders import SentenceTransformerEncoder

    t0 = time.perf_counter()
    ds = load_dataset(args.data)
    texts = ds.item_texts()
    rows = catalog_rows(args.data, args.copies)[2] if args.copies else np.arange(ds.num_items)
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mb()
    rng = np.random.default_rng(args.seed)
    sample = np.sort(rng.choice(rows, size=min(args.sample, len(rows)), replace=False))
    enc = SentenceTransformerEncoder(batch_size=args.batch_size, progress=False)
    t0 = time.perf_counter()
    enc.encode([texts[i] for i in sample[: args.batch_size]])  # loads the model, warms it up
    model_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    emb = enc.encode([texts[i] for i in sample])
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    per_s, per_cpu_s = len(sample) / seconds, len(sample) / cpu_s
    rec = {"stage": "embed", "items": len(rows), "sample": len(sample), "batch_size": args.batch_size,
           "seconds": round(seconds, 1), "items_per_s": round(per_s, 1),
           "catalog_minutes": round(len(rows) / per_s / 60, 1), "cpu_s": round(cpu_s, 1),
           "items_per_cpu_s": round(per_cpu_s, 1), "catalog_cpu_minutes": round(len(rows) / per_cpu_s / 60, 1),
           "model_load_s": round(model_s, 1),
           "data_load_s": round(load_s, 1), "rss_after_load_mb": rss_loaded,
           "mean_text_chars": round(float(np.mean([len(texts[i]) for i in sample])), 1)}  # fmt: skip
    if "source_item_id" in ds.item_meta:  # how far the variant text moves an item from its source
        real, index, _, _ = source_embeddings(args.source, args.batch_size)
        src = np.array([index[ds.item_meta["source_item_id"][i]] for i in sample])
        shift = np.linalg.norm(emb - real[src], axis=1)
        # two sampled copies of one source item: how far apart the variant text puts them
        order = np.argsort(src, kind="stable")
        same = np.flatnonzero(src[order][1:] == src[order][:-1])
        pair = np.linalg.norm(emb[order[same]] - emb[order[same + 1]], axis=1)
        rec["variant_shift"] = {"median": round(float(np.median(shift)), 4),
                                "mean": round(float(shift.mean()), 4),
                                "per_dim_rms": round(float(np.sqrt(np.mean((emb - real[src]) ** 2))), 5),
                                "noise_median": round(args.noise * math.sqrt(emb.shape[1]), 4),
                                "copy_pairs": len(pair),
                                "copy_pair_median": round(float(np.median(pair)), 4) if len(pair) else None,
                                "noise_copy_pair_median": round(args.noise * math.sqrt(2 * emb.shape[1]), 4)}  # fmt: skip
    rec["peak_rss_mb"] = peak_rss_mb()
    return rec


def collision_report(codes: np.ndarray, src: np.ndarray, codebook_size: int) -> dict:
    """Utilization, collision groups, overflow (``CollisionError``) and how copies of one item spread."""
    from model.semantic_ids.collisions import CollisionError, add_collision_code, utilization

    _, group, sizes = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    over = sizes > codebook_size
    try:
        add_collision_code(codes, codebook_size)
        error = None
    except CollisionError as exc:
        error = str(exc)
    # per source item: on how many distinct tuples its copies lie
    pairs = np.unique(np.stack([src, group], axis=1), axis=0)
    tuples_per_source = np.bincount(pairs[:, 0], minlength=int(src.max()) + 1)
    tuples_per_source = tuples_per_source[tuples_per_source > 0]
    return {
        "utilization": [round(u, 4) for u in utilization(codes, codebook_size)],
        "unique_tuples": len(sizes),
        "collisions": int(sizes[sizes > 1].sum()),
        "collision_groups": int((sizes > 1).sum()),
        "max_collision_group": int(sizes.max()),
        "groups_over_codebook": int(over.sum()),
        "items_in_groups_over_codebook": int(sizes[over].sum()),
        "collision_error": error,
        "sources_all_copies_one_tuple": int((tuples_per_source == 1).sum()),
        "median_tuples_per_source": float(np.median(tuples_per_source)),
    }


def stage_quantize(args: argparse.Namespace, method: str) -> dict:
    """``fair-sid build``'s quantizer on the made embeddings (RQ-VAE: per-epoch seconds, extrapolated)."""
    from model.semantic_ids import rqvae
    from model.semantic_ids.build import BuildConfig, quantize

    emb_path, src_path, info = made_embeddings(args)
    x, src = np.load(emb_path), np.load(src_path)
    options = {"epochs": args.rqvae_epochs} if method == "rqvae" else {}
    cfg = BuildConfig(method=method, seed=args.seed, **options)
    marks: dict[str, list[tuple[float, float]]] = {"init": [], "epoch": [], "encode": []}  # (wall, cpu)
    if method == "rqvae":  # timestamps, behaviour unchanged: init end, end of every epoch but the last
        init, reset, encode = rqvae._init_codebooks, rqvae._reset_dead_codes, rqvae.RQVAE.encode_codes

        def timed(fn, key, before=False):
            def wrapper(*a, **k):
                if before:
                    marks[key].append((time.perf_counter(), time.process_time()))
                out = fn(*a, **k)
                if not before:
                    marks[key].append((time.perf_counter(), time.process_time()))
                return out

            return wrapper

        rqvae._init_codebooks = timed(init, "init")
        rqvae._reset_dead_codes = timed(reset, "epoch")
        rqvae.RQVAE.encode_codes = timed(encode, "encode", before=True)
    t0, c0 = time.perf_counter(), time.process_time()
    codes, fit = quantize(x, cfg, progress=False)
    end = (time.perf_counter(), time.process_time())
    seconds, cpu_s = end[0] - t0, end[1] - c0
    rec = {"stage": method, "items": len(x), "noise": args.noise, "seconds": round(seconds, 1),
           "cpu_s": round(cpu_s, 1)}  # fmt: skip
    if method == "rqvae":
        default_epochs = BuildConfig().epochs
        for k, start in ((0, t0), (1, c0)):  # wall seconds, then CPU seconds
            ends = [m[k] for m in [*marks["epoch"], marks["encode"][0]]]  # the last epoch ends at encode
            starts = [m[k] for m in [marks["init"][0], *marks["epoch"]]]
            epoch_s = [round(b - a, 1) for a, b in zip(starts, ends, strict=True)]
            init_s, encode_s = marks["init"][0][k] - start, end[k] - marks["encode"][0][k]
            est = (init_s + default_epochs * float(np.mean(epoch_s)) + encode_s) / 60
            tag = "" if k == 0 else "_cpu"
            rec.update({f"epoch{tag}_s": epoch_s, f"init{tag}_s": round(init_s, 1),
                        f"encode{tag}_s": round(encode_s, 1),
                        f"default_epochs{tag}_minutes_est": round(est, 1)})  # fmt: skip
        rec.update({"epochs": cfg.epochs, "default_epochs": default_epochs,
                    "final_recon": round(fit["final_recon"], 5), "final_vq": round(fit["final_vq"], 5)})  # fmt: skip
    else:
        rec["residual_mse"] = [round(v, 6) for v in fit["residual_mse"]]
    rec.update(collision_report(codes, src, cfg.codebook_size))
    rec["peak_rss_mb"] = peak_rss_mb()
    return rec


def mean_sq_residual(x: np.ndarray, centres: np.ndarray) -> float:
    from model.semantic_ids.rqkmeans import nearest

    total = 0.0
    labels = nearest(x, centres)
    for s in range(0, len(x), 65536):
        r = x[s : s + 65536] - centres[labels[s : s + 65536]]
        total += float(np.einsum("nd,nd->", r, r, dtype=np.float64))
    return total / len(x)


def stage_kmeans(args: argparse.Namespace, which: str) -> dict:
    """Level 1 of RQ k-means (all rows, 256 centroids) by our k-means or faiss."""
    from model.semantic_ids import rqkmeans

    emb_path, _, _ = made_embeddings(args)
    x = np.load(emb_path)
    fit = x
    if args.kmeans_fit_points and args.kmeans_fit_points < len(x):
        rows = np.sort(np.random.default_rng(args.seed).choice(len(x), args.kmeans_fit_points, replace=False))
        fit = np.ascontiguousarray(x[rows])
    k, iters = args.kmeans_k, args.kmeans_iters
    rec = {"stage": which, "items": len(x), "fit_points": len(fit), "k": k, "iters": iters}
    if which == "kmeans_ours":
        calls = []
        update = rqkmeans._centroids

        def counted(*a, **kw):  # one centroid update per Lloyd iteration
            calls.append(1)
            return update(*a, **kw)

        rqkmeans._centroids = counted
        t0, c0 = time.perf_counter(), time.process_time()
        centres, _ = rqkmeans.kmeans_reference(fit, k, seed=args.seed, iters=iters)
        seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        rec["iters_run"] = len(calls)
    else:
        import faiss

        points = 256 if which == "kmeans_faiss_sub" else math.ceil(len(fit) / k)
        km = faiss.Kmeans(fit.shape[1], k, niter=iters, seed=args.seed + 1, max_points_per_centroid=points,
                          verbose=False)  # fmt: skip
        t0, c0 = time.perf_counter(), time.process_time()
        init = None
        if which == "kmeans_faiss_pp":  # our k-means++ seeds (as kmeans() draws them), faiss's Lloyd
            init = rqkmeans._kmeans_pp(fit, k, np.random.default_rng(args.seed))
            rec["seeding_s"] = round(time.perf_counter() - t0, 1)
            rec["seeding_cpu_s"] = round(time.process_time() - c0, 1)
        km.train(fit, init_centroids=init)
        seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        centres = np.ascontiguousarray(km.centroids, dtype=np.float32)
        rec["iters_run"] = iters
        rec["faiss_points_used"] = min(len(fit), points * k)
    rec["seconds"], rec["cpu_s"] = round(seconds, 1), round(cpu_s, 1)
    rec["cpu_s_per_iter"] = round(cpu_s / max(rec["iters_run"], 1), 2)
    rec["s_per_iter"] = round(seconds / max(rec["iters_run"], 1), 2)
    rec["mse"] = round(mean_sq_residual(x, centres), 6)
    rec["used_centroids"] = int(len(np.unique(rqkmeans.nearest(x, centres))))
    rec["peak_rss_mb"] = peak_rss_mb()
    return rec


def run_stage(args: argparse.Namespace) -> dict:
    set_threads(args.threads)
    if args.child == "embed":
        return stage_embed(args)
    if args.child in ("rqkmeans", "rqvae"):
        return stage_quantize(args, args.child)
    return stage_kmeans(args, args.child)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="runs/expand/beauty_1m", help="a fair-data expand catalog")
    p.add_argument(
        "--source", default="../shared/data/amazon/Beauty", help="the dataset it was expanded from"
    )
    p.add_argument("--copies", type=int, default=None, help="keep the first K variants of every item (all)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    p.add_argument("--sample", type=int, default=5000, help="texts embedded for the throughput (5000)")
    p.add_argument("--batch-size", type=int, default=64, help="text encoder batch size (fair-sid's 64)")
    p.add_argument(
        "--noise", type=float, default=0.0043, help="per-dimension std of each copy's noise (0.0043)"
    )
    p.add_argument("--rqvae-epochs", type=int, default=2, help="RQ-VAE epochs timed (default 2)")
    p.add_argument("--kmeans-k", type=int, default=256, help="centroids, faiss vs ours (256)")
    p.add_argument(
        "--kmeans-iters", type=int, default=25, help="iterations, faiss vs ours (25, as RQ k-means)"
    )
    p.add_argument("--kmeans-fit-points", type=int, default=0, help="fit on a seeded sample (0: all rows)")
    p.add_argument("--threads", type=int, default=1, help="threads for torch, BLAS and faiss (1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("runs/sid_scale"), help="cache of made embeddings")
    p.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)  # a child process: one stage
    p.add_argument("--json", action="store_true", help="print everything as one JSON object, last line")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_stage(args)))
        return 0
    stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    result = {"data": args.data, "copies": args.copies, "noise": args.noise, "threads": args.threads,
              "seed": args.seed, "machine": cpu_name(), "load_avg_before": load_average()}  # fmt: skip
    if any(s != "embed" for s in stages):
        _, _, result["embeddings"] = made_embeddings(args)  # once, before the timed children
    env = {**os.environ, **{v: str(args.threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                            "MKL_NUM_THREADS")}}  # fmt: skip
    records = []
    for stage in stages:
        child = [sys.executable, __file__, "--child", stage, *(argv if argv is not None else sys.argv[1:])]
        child = [a for a in child if a != "--json"]
        _log(f"{stage} ... (load average {load_average()})")
        done = subprocess.run(child, capture_output=True, text=True, env=env)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            records.append({"stage": stage, "error": done.stderr[-500:]})
            continue
        rec = json.loads(done.stdout.strip().splitlines()[-1])
        rec["load_avg"] = load_average()
        records.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)
    result["load_avg_after"] = load_average()
    result["stages"] = records
    print_records(records, args.json, summary=result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
