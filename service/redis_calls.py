"""A Redis call as the API answers it: Redis down -> 503 (its address only in the log), Redis at its
maxmemory refusing a write -> 503 ``redis_full``, no answer in time -> 504. One place, so every route
words an outage the same way."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from service.errors import ServiceError, unavailable
from service.redis_store import StoreFull, StoreUnavailable

T = TypeVar("T")

# The public message of every Redis outage: the address and the driver's error go to the log only.
REDIS_UNAVAILABLE = "the history store (Redis) is unavailable; retry shortly"
REDIS_FULL = "the history store (Redis) is full and refuses writes; nothing was stored, retry later"


async def redis_call(call: Awaitable[T], timeout_s: float | None) -> T:
    """Await ``call``; ``timeout_s`` None when an enclosing deadline (the request's) already bounds it."""
    try:
        if timeout_s is None:
            return await call
        async with asyncio.timeout(timeout_s):
            return await call
    except StoreFull as exc:  # noeviction at maxmemory: reads still work, writes wait for room
        raise unavailable("redis_full", REDIS_FULL, "redis_full") from exc
    except StoreUnavailable as exc:
        raise unavailable("redis_unavailable", REDIS_UNAVAILABLE, "redis_unavailable") from exc
    except TimeoutError as exc:
        if timeout_s is None:
            raise  # the enclosing deadline's: it answers
        raise ServiceError(504, "timeout", "redis did not answer in time", reject_reason="timeout") from exc
