"""Benchmark: fair-export on a Beauty-sized FAIR model; prints a markdown table (and --json).

Model: the default ``FAIRConfig`` (L=4, V=256, d_model=128, 4 layers, 4 heads, focused attention)
with random weights over ``--items`` random unique code tuples (Beauty has 12,101 items); latency
does not depend on the weights. Measured:

* export time of the fp32 bundle through ``export_bundle`` (trace + verification on 256 histories),
  and of the int8 quantization of that graph;
* latency of ONE forward pass (inputs -> code_scores + query, no search) at batch 1 and 32 with full
  ``--history``-item histories: onnxruntime fp32, onnxruntime int8, PyTorch eager (the exported plain
  attention form and the SDPA form), each with 1 and 2 intra-op threads, median and p90 of
  ``--repeats`` runs after a warm-up.

With ``--run RUN_DIR --data DIR`` (a trained run) it also exports fp32 and int8 bundles of it and
reports both bundles' Recall/NDCG@10 on the test split through the shared beam search.

    .venv/bin/python bench/bench_export.py --items 12101
    .venv/bin/python bench/bench_export.py --run runs/beauty --data ../shared/data/amazon/Beauty
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.bench_beam_search import synthetic_codes  # noqa: E402
from export.exporter import export_bundle, load_sources  # noqa: E402
from export.onnx_export import item_input_table  # noqa: E402
from export.quantize import quantize_int8  # noqa: E402
from export.verify import (  # noqa: E402
    compare,
    offline_metrics,
    onnx_fn,
    ort_session,
    synthetic_histories,
    torch_fn,
)
from model.fair import FAIR, FAIRConfig  # noqa: E402
from model.search.inputs import graph_feeds, histories_to_inputs  # noqa: E402
from model.semantic_ids.table import SemanticIdTable  # noqa: E402
from model.train.checkpoint import save_checkpoint  # noqa: E402


def write_random_run(run_dir: Path, num_items: int, max_history: int, seed: int = 0) -> Path:
    """A run directory around a default-config FAIR with random weights and a random code table."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = FAIRConfig()
    model = FAIR(cfg)
    with torch.no_grad():  # peaked code distributions as after training, so top-10 lists have no near-ties
        model.head_bias.normal_(0.0, 2.0)
    codes = synthetic_codes(num_items, cfg.num_levels, cfg.codebook_size, seed)
    table = SemanticIdTable([f"i{i}" for i in range(num_items)], codes, cfg.codebook_size)
    table.save(run_dir / "semantic_ids.npz")
    np.save(run_dir / "popular.npy", np.arange(num_items, dtype=np.int64))
    save_checkpoint(
        run_dir / "best.pt",
        {
            "model": model.state_dict(),
            "model_config": cfg.to_dict(),
            "train_config": {"max_history": max_history},
            "sid_sha256": table.sha256(),
            "step": 0,
        },
    )
    return run_dir


def timed(fn, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """(median ms, p90 ms) of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), float(np.percentile(times, 90))


def latency_rows(fp32: Path, int8: Path, model: FAIR, table, history: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        sessions = {
            "onnxruntime fp32": ort_session(fp32, threads),
            "onnxruntime int8": ort_session(int8, threads),
        }
        for batch in (1, 32):
            hist = [rng.choice(table.num_items, size=history, replace=False) for _ in range(batch)]
            inputs = histories_to_inputs(hist, table.codes, history)
            names = [i.name for i in sessions["onnxruntime fp32"].get_inputs()]
            feeds = graph_feeds(inputs, names, item_input_table(model))  # as the service feeds it
            engines = {name: (lambda s=s, f=feeds: s.run(None, f)) for name, s in sessions.items()}
            tc, ti, tm = (torch.from_numpy(a) for a in inputs)

            def eager(plain: bool, tc=tc, ti=ti, tm=tm) -> None:
                with torch.inference_mode():
                    out = model(tc, tm, plain=plain, items=ti)
                    model.query(out.history[:, -1])

            engines["pytorch eager (plain attention)"] = lambda: eager(True)
            engines["pytorch eager (SDPA)"] = lambda: eager(False)
            for name, fn in engines.items():
                med, p90 = timed(fn, repeats if batch == 1 else max(5, repeats // 3))
                rows.append(
                    {"engine": name, "threads": threads, "batch": batch, "median_ms": med, "p90_ms": p90}
                )
                print(
                    f"  {name:32s} threads={threads} batch={batch:2d}: {med:8.2f} ms (p90 {p90:.2f})",
                    file=sys.stderr,
                )
    return rows


def quality(run: Path, data: Path, out: Path) -> dict:
    """fp32 and int8 bundles of a trained run, both evaluated on the test split through onnxruntime."""
    src = load_sources(run=run, data=data)
    split = src.dataset.eval_split("test")
    result = {}
    for precision in ("fp32", "int8"):
        bundle = export_bundle(src, out, name=f"quality-{precision}", precision=precision, evaluate=False)
        t0 = time.perf_counter()
        fn = onnx_fn(ort_session(bundle.path / "model.onnx"), item_input_table(src.model))
        report = offline_metrics(fn, src.table, src.trie, split.histories, split.targets, src.max_history)
        result[precision] = report | {"seconds": round(time.perf_counter() - t0, 1)}
        print(f"  {precision}: {report}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=12101, help="catalog size (Beauty: 12,101)")
    p.add_argument("--history", type=int, default=20, help="items per history in the latency runs")
    p.add_argument("--repeats", type=int, default=50, help="timed runs at batch 1 (a third at batch 32)")
    p.add_argument("--run", type=Path, help="a trained run directory for the int8 vs fp32 quality rows")
    p.add_argument("--data", type=Path, help="its benchmark data folder (with --run)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = p.parse_args(argv)

    results: dict = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads available, "
        f"python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}",
        "items": args.items,
        "history": args.history,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = write_random_run(tmp / "run", args.items, args.history)
        torch.set_num_threads(2)
        src = load_sources(run=run)
        t0 = time.perf_counter()
        bundle = export_bundle(src, tmp / "bundles", name="bench")
        results["export_seconds_total"] = round(time.perf_counter() - t0, 2)
        results["export_seconds_trace"] = bundle.manifest["exporter"]["export_seconds"]
        results["verification"] = bundle.manifest["verification"]["fp32"]
        fp32 = bundle.path / "model.onnx"
        int8 = tmp / "model.int8.onnx"
        t0 = time.perf_counter()
        quantize_int8(fp32, int8)
        results["int8_quantize_seconds"] = round(time.perf_counter() - t0, 2)
        report = compare(
            torch_fn(src.model),
            onnx_fn(ort_session(int8), item_input_table(src.model)),
            src.table,
            src.trie,
            synthetic_histories(src.table.num_items, args.history),
            args.history,
            "int8",
        )
        results["int8_vs_pytorch"] = {
            "max_abs_diff": report.max_abs_diff,
            "top10_agreement": report.topk_agreement,
        }
        results["model_mb"] = {"fp32": fp32.stat().st_size / 2**20, "int8": int8.stat().st_size / 2**20}
        print(f"export {results['export_seconds_total']} s; latency:", file=sys.stderr)
        results["latency"] = latency_rows(fp32, int8, src.model, src.table, args.history, args.repeats)
        if args.run is not None:
            if args.data is None:
                p.error("--run needs --data (the test split to evaluate on)")
            results["quality"] = quality(args.run, args.data, tmp / "quality")

    print(
        f"\nexport (trace + verify 256 histories): {results['export_seconds_total']} s "
        f"(trace {results['export_seconds_trace']} s); int8 quantization {results['int8_quantize_seconds']} s; "
        f"model.onnx {results['model_mb']['fp32']:.1f} MB fp32, {results['model_mb']['int8']:.1f} MB int8; "
        f"int8 vs PyTorch on 256 histories: max|diff| {results['int8_vs_pytorch']['max_abs_diff']:.3g}, "
        f"top-10 identical {results['int8_vs_pytorch']['top10_agreement']:.1%}\n"
    )
    print("| engine | threads | batch 1 median ms (p90) | batch 32 median ms (p90) |")
    print("|---|---:|---:|---:|")
    rows = results["latency"]
    for name in dict.fromkeys(r["engine"] for r in rows):
        for threads in (1, 2):
            cells = {r["batch"]: r for r in rows if r["engine"] == name and r["threads"] == threads}
            print(
                f"| {name} | {threads} | "
                + " | ".join(f"{cells[b]['median_ms']:.2f} ({cells[b]['p90_ms']:.2f})" for b in (1, 32))
                + " |"
            )
    if "quality" in results:
        print(
            "\n| bundle | recall@10 | ndcg@10 | recall@5 | ndcg@5 | users |\n|---|---:|---:|---:|---:|---:|"
        )
        for prec, r in results["quality"].items():
            print(
                f"| {prec} | {r['recall@10']:.4f} | {r['ndcg@10']:.4f} | {r['recall@5']:.4f} | {r['ndcg@5']:.4f} | {r['users']} |"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
