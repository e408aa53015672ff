"""Burst benchmark: N requests arrive at once; how many are answered in time, refused fast, or time out?

The question behind it (issue 11): with the default queue (FAIR_QUEUE_SIZE=512) and deadline (1 s), a
burst of 1,500 concurrent /recommend requests ended 82% as 504 after waiting the full deadline. With
deadline-aware admission the requests that cannot be answered in time get a fast 429 + Retry-After,
and the admitted ones keep their latency.

Each server under test is ``fair-serve`` (one worker, default settings) started from a checkout
(``--server NAME=CHECKOUT_DIR``, the same Python environment for all): compare the code before and
after a change in one run, rounds alternating, on the same bundle. Every round opens N connections
first, then sends one request on each at the same moment; requests carry their own 5-item history
(drawn from the bundle's catalog), so Redis is not part of the measurement.

    .venv/bin/python bench/load/burst.py --bundle runs/quality/bundles/beauty/1 \\
        --server before=/tmp/before --server after=. --burst 1500 --rounds 3 --out runs/burst.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.load.run_load_bench import free_port, stop, wait_ready  # noqa: E402
from export.bundle import load_bundle  # noqa: E402


def requests_for(bundle: Path, n: int, seed: int = 0) -> list[bytes]:
    item_ids = load_bundle(bundle, verify=False).table.item_ids
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        history = [item_ids[j] for j in rng.choice(len(item_ids), 5, replace=False)]
        body = json.dumps({"user_id": f"burst{i}", "history": history}).encode()
        out.append(
            b"POST /recommend HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
    return out


async def one_burst(port: int, payloads: list[bytes]) -> list[tuple[int, float]]:
    """Open every connection, then send all requests at once; (status, seconds) per request."""
    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in payloads))
    go = asyncio.Event()

    async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes):
        await go.wait()
        t0 = time.perf_counter()
        writer.write(payload)
        await writer.drain()
        data = await reader.read()  # Connection: close -> until EOF
        took = time.perf_counter() - t0
        writer.close()
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
        return status, took

    tasks = [asyncio.create_task(request(r, w, p)) for (r, w), p in zip(conns, payloads, strict=True)]
    await asyncio.sleep(0.2)  # every task is waiting on the event
    go.set()
    return await asyncio.gather(*tasks)


def summarize(results: list[tuple[int, float]]) -> dict:
    statuses = np.array([s for s, _ in results])
    times = np.array([t for _, t in results])
    out: dict = {"requests": len(results)}
    for code in sorted(set(statuses.tolist())):
        sel = statuses == code
        out[str(code)] = {
            "share": round(float(sel.mean()), 4),
            "p50_ms": round(float(np.percentile(times[sel], 50) * 1000), 1),
            "p99_ms": round(float(np.percentile(times[sel], 99) * 1000), 1),
        }
    out["burst_wall_ms"] = round(float(times.max() * 1000), 1)
    return out


def start_server(
    checkout: Path, bundle: Path, port: int, data_dir: str, extra: list[str]
) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAIR_")}
    env["PYTHONPATH"] = str(checkout.resolve())
    args = [sys.executable, "-m", "service.cli", "--bundle", str(bundle.resolve()), "--port", str(port)]
    args += ["--data-dir", data_dir, "--log-level", "warning", *extra]
    return subprocess.Popen(args, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle version directory")
    ap.add_argument(
        "--server", action="append", required=True, metavar="NAME=CHECKOUT", help="a checkout to serve from"
    )
    ap.add_argument("--burst", type=int, default=1500, help="concurrent requests per round")
    ap.add_argument("--rounds", type=int, default=3, help="bursts per server (alternating servers)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument(
        "--serve-args",
        default="",
        help="extra fair-serve flags for every server, e.g. '--max-batch-size 1' (inference-bound)",
    )
    args = ap.parse_args(argv)
    servers = dict(s.split("=", 1) for s in args.server)
    payloads = requests_for(args.bundle, args.burst)
    results: dict[str, list] = {name: [] for name in servers}
    for rnd in range(args.rounds):
        for name, checkout in servers.items():
            port = free_port()
            with tempfile.TemporaryDirectory(prefix="fair-burst-") as data_dir:
                proc = start_server(Path(checkout), args.bundle, port, data_dir, args.serve_args.split())
                try:
                    wait_ready(f"http://127.0.0.1:{port}", proc, "/readyz")
                    asyncio.run(
                        one_burst(port, payloads[:64])
                    )  # warm: connections, caches, the cost estimate
                    time.sleep(0.5)
                    summary = summarize(asyncio.run(one_burst(port, payloads)))
                finally:
                    stop(proc)
            results[name].append(summary)
            print(f"round {rnd + 1} {name}: {json.dumps(summary)}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"burst": args.burst, "serve_args": args.serve_args, "bundle": str(args.bundle)}
        args.out.write_text(json.dumps({**meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
