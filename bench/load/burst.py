"""Burst benchmark: more /recommend requests than the service can answer in time, all at once or at a
fixed rate far above its maximum. How many are answered in time, refused fast, or time out?

The questions behind it: issue 11 (a burst of 1,500 concurrent requests ended 82% as 504 after the full
deadline) and issue 23 item 3 (4,000 simultaneous requests, and 10x the maximum rate for 5 s, must end
with <= 5% 504, 429s answered in < 100 ms and the admitted requests' p99 inside the deadline).

Two shapes of load:

* ``--burst N``: N connections are opened first, then one request is sent on each at the same moment.
* ``--rate R --seconds S``: open loop, request i is due at ``i / R`` s whatever the service answers; it
  goes out on an idle keep-alive connection, or a new one when none is idle. Latencies count from the
  due time (a request the client could not send on time still counts its wait: no coordinated
  omission).

The client is one thread driving non-blocking sockets through ``selectors`` (no asyncio, no HTTP
library): per request it costs a send and a receive, so on a shared machine the time it measures is
the service's, not its own scheduling. Each request's latency runs from its send (burst) or due time
(rate) to the complete response.

Histories: ``--source body`` sends a 5-item history in each request (no Redis read), ``--source redis``
sends only a user id whose history was stored beforehand through POST /users/{id}/events (the read
from Redis is part of every request).

Each server under test is ``fair-serve`` (one worker, default settings unless ``--serve-args``) started
from a checkout (``--server NAME=CHECKOUT_DIR``, the same Python environment for all): compare the code
before and after a change in one run, rounds alternating, on the same bundle. ``--server NAME=bare`` is
the floor: uvicorn with a bare ASGI app that answers everything 429 at once (what the HTTP layer and the
client alone cost on the machine).

    .venv/bin/python bench/load/burst.py --bundle /tmp/bundles/beauty/1 \\
        --server before=/tmp/before --server after=. --burst 4000 --source redis --rounds 2
    .venv/bin/python bench/load/burst.py --bundle /tmp/bundles/beauty/1 --server after=. \\
        --rate 13000 --seconds 5 --source body
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.load.run_load_bench import free_port, stop, wait_ready  # noqa: E402
from export.bundle import load_bundle  # noqa: E402

TIMEOUT_S = 10.0  # a request with no complete answer after this counts as status 0


# ---- requests ------------------------------------------------------------------------------------
def histories(bundle: Path, n: int, seed: int = 0) -> list[list[str]]:
    item_ids = load_bundle(bundle, verify=False).table.item_ids
    rng = np.random.default_rng(seed)
    return [[item_ids[j] for j in rng.choice(len(item_ids), 5, replace=False)] for _ in range(n)]


def request_bytes(body: dict, keep_alive: bool) -> bytes:
    data = json.dumps(body).encode()
    connection = b"keep-alive" if keep_alive else b"close"
    return (
        b"POST /recommend HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nConnection: "
        + connection
        + b"\r\nContent-Length: "
        + str(len(data)).encode()
        + b"\r\n\r\n"
        + data
    )


def payloads(hist: list[list[str]], source: str, keep_alive: bool) -> list[bytes]:
    if source == "redis":
        return [request_bytes({"user_id": f"burst{i}"}, keep_alive) for i in range(len(hist))]
    return [request_bytes({"user_id": f"anon{i}", "history": h}, keep_alive) for i, h in enumerate(hist)]


def store_histories(url: str, hist: list[list[str]]) -> None:
    """POST each user's history (users burst0..burstN-1), 16 at a time, before the measured load."""
    import asyncio

    async def run() -> None:
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def one(i: int, items: list[str]) -> None:
                async with sem:
                    r = await client.post(f"/users/burst{i}/events", json={"item_ids": items})
                    r.raise_for_status()

            await asyncio.gather(*(one(i, h) for i, h in enumerate(hist)))

    asyncio.run(run())


# ---- the client ----------------------------------------------------------------------------------
@dataclass
class Conn:
    sock: socket.socket
    connected: bool = False
    pending: bytes = b""  # request bytes not yet sent
    started: float = 0.0  # when the request in flight counts from
    buf: bytearray = field(default_factory=bytearray)
    busy: bool = False


def _response_end(buf: bytearray) -> tuple[int, int] | None:
    """(status, bytes of the whole response) once ``buf`` holds a complete response, else None."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = bytes(buf[:head_end]).lower()
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    total = head_end + 4 + length
    if len(buf) < total:
        return None
    return int(head.split(b" ", 2)[1]), total


class Client:
    """Non-blocking sockets on one selector; ``results`` collects (status, seconds) per request."""

    def __init__(self, port: int, keep_alive: bool):
        self.port, self.keep_alive = port, keep_alive
        self.sel = selectors.DefaultSelector()
        self.idle: list[Conn] = []
        self.results: list[tuple[int, float]] = []
        self.in_flight = 0

    def open(self) -> Conn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(("127.0.0.1", self.port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        conn = Conn(sock)
        self.sel.register(sock, selectors.EVENT_WRITE, conn)
        return conn

    def send(self, conn: Conn, payload: bytes, started: float) -> None:
        conn.busy, conn.started, conn.pending = True, started, payload
        self.in_flight += 1
        if conn.connected:
            self._flush(conn)

    def _flush(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.pending)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._finish(conn, 0)
            return
        conn.pending = conn.pending[sent:]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.pending else 0)
        self.sel.modify(conn.sock, events, conn)

    def _finish(self, conn: Conn, status: int) -> None:
        if conn.busy:
            self.results.append((status, time.perf_counter() - conn.started))
            self.in_flight -= 1
        conn.busy = False
        conn.buf.clear()
        if status == 0 or not self.keep_alive:
            self._close(conn)
        else:
            self.idle.append(conn)

    def _close(self, conn: Conn) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()
        conn.busy = False
        if conn in self.idle:
            self.idle.remove(conn)

    def poll(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            conn: Conn = key.data
            if not conn.connected and mask & selectors.EVENT_WRITE:
                err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._finish(conn, 0)
                    continue
                conn.connected = True
                if conn.busy:
                    self._flush(conn)
                else:
                    self.sel.modify(conn.sock, selectors.EVENT_READ, conn)
                continue
            if mask & selectors.EVENT_WRITE and conn.pending:
                self._flush(conn)
            if mask & selectors.EVENT_READ:
                self._read(conn)

    def _read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # closed by the server
            if conn.busy:
                done = _response_end(conn.buf)
                self._finish(conn, done[0] if done else 0)
            self._close(conn)
            return
        conn.buf += data
        done = _response_end(conn.buf)
        if done is not None and conn.busy:
            self._finish(conn, done[0])

    def expire(self, now: float) -> None:
        for key in list(self.sel.get_map().values()):
            conn: Conn = key.data
            if conn.busy and now - conn.started > TIMEOUT_S:
                self._finish(conn, 0)


def run_burst(port: int, requests: list[bytes]) -> list[tuple[int, float]]:
    """Open every connection, then send one request on each as fast as one thread can."""
    client = Client(port, keep_alive=False)
    conns = []
    for _ in requests:
        conns.append(client.open())
        if len(conns) % 256 == 0:  # let the server accept as we go (its listen backlog is bounded)
            client.poll(0.001)
    deadline = time.perf_counter() + 30
    while not all(c.connected for c in conns):
        if time.perf_counter() > deadline:
            raise RuntimeError("connections not established within 30 s")
        client.poll(0.05)
    time.sleep(0.5)  # the server has accepted and registered every connection
    for n, (conn, payload) in enumerate(zip(conns, requests, strict=True)):
        client.send(conn, payload, time.perf_counter())
        if n % 64 == 63:  # answers arriving meanwhile are timed when they arrive, not after the sends
            client.poll(0)
    while client.in_flight:
        client.poll(0.05)
        client.expire(time.perf_counter())
    return client.results


def run_rate(port: int, requests: list[bytes], rate: float, seconds: float, pool: int) -> tuple[list, dict]:
    """Open loop: request i is due at start + i / rate; it counts from then, sent or not. ``pool``
    keep-alive connections are opened first; a request due when none is idle opens another."""
    client = Client(port, keep_alive=True)
    conns = [client.open() for _ in range(pool)]
    deadline = time.perf_counter() + 30
    while not all(c.connected for c in conns):
        if time.perf_counter() > deadline:
            raise RuntimeError("connections not established within 30 s")
        client.poll(0.05)
    client.idle.extend(conns)
    time.sleep(0.5)
    total = int(rate * seconds)
    start = time.perf_counter()
    n = opened = 0
    late: list[float] = []
    expired_at = start
    while n < total or client.in_flight:
        now = time.perf_counter()
        while n < total and start + n / rate <= now:
            due = start + n / rate
            late.append(now - due)
            if client.idle:
                conn = client.idle.pop()
            else:
                conn, opened = client.open(), opened + 1
            client.send(conn, requests[n % len(requests)], due)
            n += 1
            if n % 64 == 0:
                break  # read answers between sends: a burst of sends must not delay their timing
        next_due = start + n / rate if n < total else now + 0.05
        client.poll(max(0.0, min(0.01, next_due - time.perf_counter())))
        if time.perf_counter() - expired_at > 0.5:
            expired_at = time.perf_counter()
            client.expire(expired_at)
    sent_at = np.array(late)
    return client.results, {
        "connections_opened_during": opened,
        # how late the client itself sent (its own limit): far behind the schedule, the rate was not offered
        "client_late_p99_ms": round(float(np.percentile(sent_at, 99) * 1000), 1),
        "wall_s": round(time.perf_counter() - start, 2),
    }


def summarize(results: list[tuple[int, float]]) -> dict:
    statuses = np.array([s for s, _ in results])
    times = np.array([t for _, t in results])
    out: dict = {"requests": len(results)}
    for code in sorted(set(statuses.tolist())):
        sel = statuses == code
        out[str(code)] = {
            "n": int(sel.sum()),
            "share": round(float(sel.mean()), 4),
            "p50_ms": round(float(np.percentile(times[sel], 50) * 1000), 1),
            "p99_ms": round(float(np.percentile(times[sel], 99) * 1000), 1),
            "max_ms": round(float(times[sel].max() * 1000), 1),
        }
    return out


BARE_BODY = b'{"error":{"code":"overloaded","message":"bare"}}'


async def bare_app(scope, receive, send) -> None:
    """The floor: a bare ASGI app answering every request 429 at once (no FastAPI, no admission), to
    tell what uvicorn and the client alone cost per request on this machine (``--server NAME=bare``)."""
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(BARE_BODY)).encode())]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": BARE_BODY})


def start_server(
    checkout: Path, bundle: Path, port: int, data_dir: str, extra: list[str]
) -> subprocess.Popen:
    if str(checkout) == "bare":
        here = Path(__file__).resolve()
        args = [sys.executable, "-m", "uvicorn", "--app-dir", str(here.parent), "burst:bare_app"]
        args += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
        env = {**os.environ, "PYTHONPATH": str(here.parents[2])}
        return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAIR_")}
    env["PYTHONPATH"] = str(checkout.resolve())
    args = [sys.executable, "-m", "service.cli", "--bundle", str(bundle.resolve()), "--port", str(port)]
    args += ["--data-dir", data_dir, "--log-level", "warning", *extra]
    return subprocess.Popen(args, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listening on port {port} within {timeout_s:.0f} s")


def service_metrics(url: str) -> dict:
    """The service's own count of refusals by reason, and its admission capacity (absent before)."""
    out: dict = {"rejected": {}}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("fair_requests_rejected_total{"):
            value = float(line.split()[-1])
            if value:
                out["rejected"][line.split('reason="')[1].split('"')[0]] = value
        elif line.startswith("fair_admission_capacity "):
            out["admission_capacity"] = float(line.split()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle version directory")
    ap.add_argument(
        "--server", action="append", required=True, metavar="NAME=CHECKOUT", help="a checkout to serve from"
    )
    shape = ap.add_mutually_exclusive_group(required=True)
    shape.add_argument("--burst", type=int, help="simultaneous requests per round")
    shape.add_argument("--rate", type=float, help="open-loop requests per second (with --seconds)")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of a --rate round")
    ap.add_argument(
        "--pool", type=int, default=2000, help="keep-alive connections opened before a --rate round"
    )
    ap.add_argument("--source", choices=("body", "redis"), default="body", help="where histories come from")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per server (alternating servers)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--serve-args", default="", help="extra fair-serve flags for every server")
    args = ap.parse_args(argv)
    servers = dict(s.split("=", 1) for s in args.server)
    users = min(args.burst or 4000, 4000)
    hist = histories(args.bundle, users)
    requests = payloads(hist, args.source, keep_alive=args.rate is not None)
    results: dict[str, list] = {name: [] for name in servers}
    for rnd in range(args.rounds):
        for name, checkout in servers.items():
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with tempfile.TemporaryDirectory(prefix="fair-burst-") as data_dir:
                proc = start_server(Path(checkout), args.bundle, port, data_dir, args.serve_args.split())
                try:
                    bare = checkout == "bare"
                    if bare:
                        _wait_port(port, proc)
                    else:
                        wait_ready(url, proc, "/readyz")
                    if args.source == "redis" and not bare:
                        store_histories(url, hist)
                    run_burst(port, requests[:64])  # warm: connections, caches, the cost estimate
                    time.sleep(0.5)
                    load = os.getloadavg()[0]
                    extra: dict = {}
                    if args.burst is not None:
                        raw = run_burst(port, requests[: args.burst])
                    else:
                        raw, extra = run_rate(port, requests, args.rate, args.seconds, args.pool)
                    summary = {"load_avg_1m": round(load, 2), **summarize(raw), **extra}
                    if not bare:
                        summary.update(service_metrics(url))
                finally:
                    stop(proc)
            results[name].append(summary)
            print(f"round {rnd + 1} {name}: {json.dumps(summary)}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: getattr(args, k) for k in ("burst", "rate", "seconds", "source", "serve_args")}
        args.out.write_text(json.dumps({**meta, "bundle": str(args.bundle), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
