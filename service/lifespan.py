"""Startup and shutdown of one worker: Redis (embedded or a URL), the history store, the batcher, the
model and the poller; in reverse at shutdown, after uvicorn has stopped accepting and drained."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI

from service import metrics
from service.batcher import Batcher
from service.embedded_redis import EmbeddedRedis
from service.engine import single_threaded_blas
from service.redis_store import HistoryStore, async_client
from service.redis_supervisor import RedisSupervisor
from service.state import AppState, load_at_startup, poll_bundles, swap

log = logging.getLogger("fair.lifespan")

# The event loop and the inference thread share the GIL. When one wants it back (ONNX Runtime returned,
# or a request arrived), CPython makes the holder drop it only after the switch interval (5 ms by
# default): under load each side stalls the other by up to that much per hand-over. 0.1 ms: ~1,120 ->
# ~1,330 req/s closed-loop on the trained Beauty bundle, 1 worker (wrk c=16, 2 runs each of 0.5 / 0.2 /
# 0.1 / 0.05 ms; 0.05 was no better than 0.1).
GIL_SWITCH_INTERVAL_S = 0.0001


def lifespan_of(state: AppState) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = state.settings
        metrics.init_series()
        metrics.set_manual_pin(None)
        previous_switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        blas = single_threaded_blas()
        await _connect_redis(state)
        state.batcher = Batcher(s.max_batch_size, s.max_wait_ms, s.queue_size)
        try:
            if s.bundle is not None:
                if not s.bundle_signing_key:
                    log.warning(
                        "bundles are not authenticated: FAIR_BUNDLE_SIGNING_KEY is unset, so whoever can "
                        "write under %s decides what is served (docs/operations.md, Security)",
                        state.model_dir,
                    )
                swap(state, await asyncio.to_thread(load_at_startup, state))
            else:
                log.warning("no bundle configured (FAIR_BUNDLE): /recommend answers 503 until a reload")
            if s.bundle_poll_s > 0 and not state.pinned and s.bundle is not None:
                state.poll_task = asyncio.create_task(poll_bundles(state))
            yield
        finally:
            await _shut_down(state)
            sys.setswitchinterval(previous_switch_interval)
            blas.restore_original_limits()

    return lifespan


async def _connect_redis(state: AppState) -> None:
    """The history store on FAIR_REDIS_URL, or on the embedded server of FAIR_DATA_DIR (started and
    supervised here, unless fair-serve started it and handed it down as its URL)."""
    s = state.settings
    url, embedded = s.redis_url, EmbeddedRedis(s.data_dir, s.redis_maxmemory)
    if url is None:  # we start the embedded server, so we supervise it
        state.embedded = await asyncio.to_thread(embedded.start)
        url = embedded.url
        if embedded.proc is not None:  # not one reused from another process
            state.supervisor = RedisSupervisor(embedded, s.redis_restart_attempts).start()
    elif url == embedded.url:  # fair-serve's embedded server, supervised there
        state.embedded = embedded
    state.store = HistoryStore(
        async_client(url, s.redis_cluster, s.redis_timeout_ms / 1000.0, s.redis_max_connections),
        prefix=s.history_key_prefix,
        max_items=s.history_max_items,
        max_concurrency=s.redis_max_connections,
        cluster=s.redis_cluster,
        history_ttl_s=s.history_ttl_s,
        idem_prefix=s.idempotency_key_prefix,
    )


async def _shut_down(state: AppState) -> None:
    for task in (state.poll_task, *state.trim_tasks):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # cleanup must go on
                await task
    # Graceful shutdown: uvicorn has stopped accepting and waited for open requests; finish whatever is
    # still queued, then release Redis.
    if state.batcher is not None:
        await asyncio.to_thread(state.batcher.close)
    if state.store is not None:
        await state.store.close()
    if state.supervisor is not None:  # first, or stopping the server would look like a crash
        await asyncio.to_thread(state.supervisor.stop)
    if state.embedded is not None:
        await asyncio.to_thread(state.embedded.stop)  # a no-op unless we started it
