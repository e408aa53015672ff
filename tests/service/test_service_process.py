"""``fair-serve`` as operators run it: two worker processes whose metrics add up, the embedded Redis
restarted by fair-serve when it dies, and SIGTERM draining requests that are still queued for inference.

Every wait is on a condition (the append-only file holds the write, the service has read every request
and answered none), not on a fixed sleep: on a loaded 2-core machine a sleep is either too short or
proves nothing."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from service_testlib import sample, scrape

from service.embedded_redis import EmbeddedRedis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_pid(parent: int, name: str) -> int | None:
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                    return int(pid)
            except FileNotFoundError:
                continue
    return None


def _history_when_up(url: str, user: str) -> list[str]:
    deadline = time.monotonic() + 20
    while True:
        r = httpx.get(f"{url}/users/{user}/history", timeout=10)
        if r.status_code == 200:
            return r.json()["item_ids"]
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
        time.sleep(0.1)


def _wait_until(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.02)


def _send_recommend(port: int, body: dict) -> socket.socket:
    """One POST /recommend on its own connection, written whole; the answer is read later."""
    data = json.dumps(body).encode()
    head = (
        f"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(head.encode() + data)
    return sock


def _unread_by_service(port: int) -> list[int]:
    """Bytes waiting to be read on the service's end of each established connection (``ss`` Recv-Q)."""
    ss = shutil.which("ss")
    assert ss is not None, "`ss` (iproute2) is needed to see what the service has read"
    out = subprocess.run(
        [ss, "-tnH", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    return [int(line.split()[0]) for line in out.splitlines() if line.strip()]


def _status_of(sock: socket.socket) -> int:
    """The HTTP status of the answer on ``sock`` (read to the end: ``Connection: close``)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    status_line = b"".join(chunks).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    return int(status_line.split()[1])


def test_two_workers_sum_metrics_and_sigterm_drains(tiny_bundle):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    ids = tiny_bundle.dataset.item_ids
    with tempfile.TemporaryDirectory(prefix="fair-proc-") as data_dir:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FAIR_", "PROMETHEUS_"))}
        args = [
            sys.executable, "-m", "service.cli",
            "--bundle", str(tiny_bundle.model_dir), "--port", str(port), "--workers", "2",
            "--data-dir", data_dir, "--providers", "CPUExecutionProvider",
            "--max-wait-ms", "1000", "--request-timeout-ms", "30000", "--log-level", "warning",
        ]  # fmt: skip
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "fair-serve did not become ready"
                try:
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)

            def recommend(i: int) -> int:
                body = {"user_id": f"p{i}", "history": ids[i % 50 : i % 50 + 3]}
                return httpx.post(url + "/recommend", json=body, timeout=60).status_code

            with ThreadPoolExecutor(16) as pool:  # fresh connections: both workers get traffic
                assert list(pool.map(recommend, range(40))) == [200] * 40
            for _ in range(4):  # whichever worker answers the scrape, it reports all workers
                m = scrape(url)
                assert (
                    sample(m, "fair_request_duration_seconds_count", route="/recommend", status="200") == 40
                )

            # The embedded Redis dies: fair-serve (not a worker) started it, so fair-serve restarts it
            # and both workers serve again without a process restart.
            assert httpx.post(url + "/users/w/events", json={"item_ids": ids[:2]}).status_code == 200
            # Redis writes its append-only file before it answers (fsync follows within a second): a
            # killed process (not a crashed machine) loses nothing once the file holds the write
            aof = Path(data_dir) / "histories.aof"
            _wait_until(
                lambda: aof.exists() and b"fair:history:w" in aof.read_bytes(), "the write in the AOF"
            )
            redis_pid = _child_pid(proc.pid, "redis-server")
            os.kill(redis_pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while _child_pid(proc.pid, "redis-server") in (None, redis_pid):
                assert time.monotonic() < deadline, "fair-serve did not restart its Redis"
                time.sleep(0.1)
            with ThreadPoolExecutor(8) as pool:  # fresh connections: both workers
                histories = list(pool.map(lambda _: _history_when_up(url, "w"), range(8)))
            assert histories == [ids[:2]] * 8

            # SIGTERM while requests wait in the batcher (max_wait 1 s): all of them are answered. It is
            # sent once the service has read all 12 requests and answered none; a round whose batch
            # window ended first (a stalled machine) is simply answered, and another round is sent.
            for _ in range(20):
                socks = [
                    _send_recommend(port, {"user_id": f"t{i}", "history": ids[i % 50 : i % 50 + 3]})
                    for i in range(12)
                ]

                def _read_all(socks=socks) -> bool:
                    unread = _unread_by_service(port)
                    return len(unread) >= len(socks) and not any(unread)

                _wait_until(_read_all, "the service reading the 12 requests")
                answered, _, _ = select.select(socks, [], [], 0)
                if not answered:
                    proc.send_signal(signal.SIGTERM)
                    break
                assert [_status_of(s) for s in socks] == [200] * 12  # answered before the signal
            else:
                raise AssertionError("20 rounds: the batch window always ended before the signal")
            assert [_status_of(s) for s in socks] == [200] * 12
            assert proc.wait(timeout=60) == 0
            assert not (Path(data_dir) / "redis.sock").exists()  # embedded Redis shut down too
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_single_worker_sigterm_exits_cleanly_and_stops_redis(tiny_bundle):
    """uvicorn re-raises the SIGTERM it stopped on; fair-serve must still stop its embedded Redis."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="fair-proc1-") as data_dir:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FAIR_", "PROMETHEUS_"))}
        args = [
            sys.executable, "-m", "service.cli", "--bundle", str(tiny_bundle.model_dir), "--port", str(port),
            "--data-dir", data_dir, "--providers", "CPUExecutionProvider", "--log-level", "warning",
        ]  # fmt: skip
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 90
            while not (Path(data_dir) / "redis.sock").exists() or not _ready(f"http://127.0.0.1:{port}"):
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "fair-serve did not become ready"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
            assert not (Path(data_dir) / "redis.sock").exists()
            assert (Path(data_dir) / "histories.rdb").exists()  # snapshot written on the way out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            EmbeddedRedis(data_dir).shutdown_if_running()  # never leave a server behind on failure


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
