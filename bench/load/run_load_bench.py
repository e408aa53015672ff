"""Load benchmark of the recommendation service, driven by wrk (Debian package ``wrk``).

In one run, on one machine:
  1. in-process throughput of forward pass + the bundle's search per batch size (ONNX Runtime,
     same thread settings as the service), the ceiling for inference;
  2. a no-op FastAPI endpoint (bench/load/noop_app.py) under wrk: the ceiling of the HTTP stack;
  3. the service (``fair-serve``, histories bulk-loaded into its embedded Redis): closed-loop wrk at
     growing connection counts -> the maximum throughput whose p99 stays under 100 ms;
  4. the service at fixed request rates (fractions of that maximum): p50 / p95 / p99.

    .venv/bin/python bench/load/run_load_bench.py --bundle runs/load-bench/bundles/beauty \\
        --data ../shared/data/amazon/Beauty --out runs/load-bench/results.json

Latencies are wrk's (send to last byte, no coordinated-omission correction: at fixed rates a stalled
server delays the next sends of a connection, so tails under overload are understated; the fixed-rate
points below the maximum are where the numbers are meaningful).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
LUA = HERE / "recommend.lua"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, path: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url}{path} not ready within {timeout_s}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wrk(url: str, path: str, users: Path, connections: int, seconds: float, interval_ms: float = 0.0) -> dict:
    cmd = [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", "-s", str(LUA),
        url, "--", path, str(users), f"{interval_ms:.4f}", "10", "20",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[len("RESULT ") :])
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = sum(v for k, v in r.items() if k.startswith("errors_"))
    for q in ("p50", "p95", "p99", "max"):
        r[f"{q}_ms"] = r.pop(f"{q}_us") / 1000.0
    r["connections"], r["interval_ms"] = connections, interval_ms
    return r


def in_process(
    bundle: Path, histories: list[np.ndarray], batch_sizes, seconds: float, threads: int
) -> list[dict]:
    """Forward pass + search per batch size, on random batches of the dataset's users.

    Every iteration takes the next of 256 pre-drawn batches, so the figure reflects the users the
    service gets: a batch is padded to its longest history, so one fixed batch per size (what an
    earlier version measured) was off by -21% to +32% depending on which users it drew (Beauty).
    """
    from service.engine import load_engine, single_threaded_blas

    single_threaded_blas()  # as the service does (service/app.py lifespan)
    engine = load_engine(
        bundle, providers=["CPUExecutionProvider"], intra_op_threads=threads, inter_op_threads=1
    )
    rows = []
    rng = np.random.default_rng(0)
    for b in batch_sizes:
        batches = [
            [histories[i] for i in rng.choice(len(histories), size=b, replace=False)] for _ in range(256)
        ]
        for batch in batches[:8]:  # warm-up
            engine.search(engine.forward(batch), 20, 10, batch)
        fwd = beam = 0.0
        n = 0
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end or n < 3:
            batch = batches[n % len(batches)]
            t0 = time.perf_counter()
            scores = engine.forward(batch)
            t1 = time.perf_counter()
            engine.search(scores, 20, 10, batch)
            t2 = time.perf_counter()
            fwd, beam, n = fwd + t1 - t0, beam + t2 - t1, n + 1
        rows.append(
            {
                "batch": b,
                "forward_ms": 1000 * fwd / n,
                "search_ms": 1000 * beam / n,
                "users_per_s": b * n / (fwd + beam),
            }
        )
        print(f"in-process batch {b:4d}: forward {rows[-1]['forward_ms']:.2f} ms, search {rows[-1]['search_ms']:.2f} ms, "
              f"{rows[-1]['users_per_s']:.0f} users/s", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="BUNDLE_ROOT/NAME[/VERSION]")
    p.add_argument("--data", default="../shared/data/amazon/Beauty", help="dataset whose users are loaded")
    p.add_argument(
        "--work", type=Path, default=Path("runs/load-bench"), help="scratch dir (Redis data, users)"
    )
    p.add_argument("--out", type=Path, default=Path("runs/load-bench/results.json"))
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each wrk run")
    p.add_argument("--connections", default="1,2,4,8,16", help="closed-loop connection counts")
    p.add_argument("--fractions", default="0.25,0.5,0.75,0.9", help="fixed rates as fractions of the maximum")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128")
    p.add_argument(
        "--threads", type=int, default=1, help="onnxruntime intra-op threads (service and in-process)"
    )
    p.add_argument("--serve-args", default="", help="extra fair-serve flags, e.g. '--max-wait-ms 0'")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("run_load_bench: wrk not found (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    from model.data.loading import load_dataset

    args.work.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(args.data)
    users_file = args.work / "users.txt"
    users_file.write_text("\n".join(dataset.user_ids) + "\n")
    split = dataset.eval_split("test")
    results: dict = {"machine": os.uname().machine, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}

    # 1. in-process forward + search
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    results["in_process"] = in_process(args.bundle, split.histories, sizes, 3.0, args.threads)
    best = max(results["in_process"], key=lambda r: r["users_per_s"])
    results["in_process_best"] = best

    env = {k: v for k, v in os.environ.items() if not k.startswith("FAIR_")}
    # 2. no-op FastAPI ceiling
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    noop = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "noop_app:app", "--app-dir", str(HERE), "--port", str(port),
         "--no-access-log", "--log-level", "warning"],
        env=env,
    )  # fmt: skip
    try:
        wait_ready(url, noop, "/docs")
        wrk(url, "/noop", users_file, 32, 2)
        results["noop"] = [wrk(url, "/noop", users_file, c, args.seconds) for c in (32,)]
        print(f"no-op ceiling: {results['noop'][0]['rps']:.0f} req/s", flush=True)
    finally:
        stop(noop)

    # 3 + 4. the service
    redis_dir = args.work / "redis"
    subprocess.run(
        [sys.executable, "-m", "service.load_histories", "--data", args.data, "--data-dir", str(redis_dir)],
        env=env, check=True,
    )  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve_cmd = [
        sys.executable, "-m", "service.cli", "--bundle", str(args.bundle), "--port", str(port),
        "--data-dir", str(redis_dir), "--providers", "CPUExecutionProvider", "--log-level", "warning",
        "--intra-op-threads", str(args.threads), "--default-beam-size", "20", *args.serve_args.split(),
    ]  # fmt: skip
    results["serve_cmd"] = " ".join(serve_cmd[1:])
    serve = subprocess.Popen(serve_cmd, env=env)
    try:
        wait_ready(url, serve, "/readyz")
        wrk(url, "/recommend", users_file, 16, 3)  # warm-up
        closed = []
        for c in [int(x) for x in args.connections.split(",")]:
            r = wrk(url, "/recommend", users_file, c, args.seconds)
            closed.append(r)
            print(f"closed loop c={c:3d}: {r['rps']:7.0f} req/s  p50 {r['p50_ms']:.1f}  p99 {r['p99_ms']:.1f} ms  "
                  f"errors {r['errors']}", flush=True)  # fmt: skip
        results["closed_loop"] = closed
        ok = [r for r in closed if r["p99_ms"] < 100 and r["errors"] == 0]
        max_rps = max((r["rps"] for r in ok), default=0.0)
        results["max_rps_p99_under_100ms"] = max_rps
        fixed = []
        if max_rps == 0:
            print("no closed-loop point had p99 < 100 ms: no fixed-rate runs", flush=True)
        for frac in [float(f) for f in args.fractions.split(",")] if max_rps else []:
            rate = frac * max_rps
            r = wrk(url, "/recommend", users_file, 64, args.seconds, interval_ms=1000.0 / rate)
            r["target_rps"], r["fraction"] = rate, frac
            fixed.append(r)
            print(f"fixed {frac:.2f} x max = {rate:6.0f} req/s: got {r['rps']:6.0f}  p50 {r['p50_ms']:.2f}  "
                  f"p95 {r['p95_ms']:.2f}  p99 {r['p99_ms']:.2f} ms  errors {r['errors']}", flush=True)  # fmt: skip
        results["fixed_rate"] = fixed
        metrics = httpx.get(url + "/metrics", timeout=10).text
        sums = {
            ln.split()[0]: float(ln.split()[1])
            for ln in metrics.splitlines()
            if ln.startswith("fair_batch_size_")
        }
        results["mean_batch_size"] = sums.get("fair_batch_size_sum", 0) / max(
            sums.get("fair_batch_size_count", 1), 1
        )
        results["model"] = httpx.get(url + "/model", timeout=10).json()["manifest"]["model_config"]
    finally:
        stop(serve)
    results["loadavg_end"] = os.getloadavg()
    results["service_vs_in_process"] = max_rps / best["users_per_s"] if best["users_per_s"] else 0.0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"max service throughput (p99 < 100 ms): {max_rps:.0f} req/s = "
          f"{100 * results['service_vs_in_process']:.0f}% of in-process {best['users_per_s']:.0f} users/s "
          f"(batch {best['batch']}); mean batch {results['mean_batch_size']:.1f}; results in {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
