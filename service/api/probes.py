"""Public routes: liveness, readiness, metrics and the public model summary (no secrets, no paths)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service import errors, metrics
from service.api.deps import ServingEngine, State, Store
from service.auth import PublicRoute
from service.errors import ServiceError
from service.model_info import public_model_summary
from service.redis_store import StoreUnavailable
from service.schemas import HealthResponse, PublicModelResponse, ReadyResponse, error_responses

router = APIRouter(route_class=PublicRoute)


@router.get(
    "/healthz",
    response_model=HealthResponse,
    response_model_exclude_none=True,
    responses=error_responses(500, 503),
    summary="Process alive; 503 when the embedded Redis died and could not be restarted (restart me); "
    "fallback_from lists newer bundle versions that failed to load (a restart would not help: still 200)",
)
async def healthz(state: State) -> HealthResponse:
    if state.embedded is not None and state.embedded.given_up():
        # the reason (with file paths) is in the log and in FAIR_DATA_DIR/redis.failed, not here
        raise ServiceError(
            503, "redis_failed", "the embedded Redis died and could not be restarted; see the service log"
        )
    # versions only: the reasons name file paths, which public answers never carry (/admin/model has them)
    return HealthResponse(fallback_from=list(state.fallback_from()) or None)


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "not ready (Retry-After set)"}, 500: {}},
    summary="Model loaded and warmed up, Redis answering",
)
async def readyz(state: State, store: Store) -> JSONResponse:
    try:
        async with asyncio.timeout(state.settings.redis_timeout_ms / 1000.0 * 2):
            redis_ok = await store.ping()
    except TimeoutError:
        redis_ok = False
    checks = {"model": state.engine is not None, "redis": redis_ok}
    ready = all(checks.values())
    return JSONResponse(
        {"ready": ready, "checks": checks},
        status_code=200 if ready else 503,
        headers=None if ready else {"Retry-After": str(errors.RETRY_AFTER_S)},
    )


@router.get(
    "/metrics",
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition"}, 500: {}},
    summary="Prometheus metrics (all workers in multiprocess mode)",
)
async def metrics_endpoint(state: State) -> Response:
    await _refresh_redis_memory(state)
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


async def _refresh_redis_memory(state: State) -> None:
    """Redis memory into its gauges, read at scrape time (one INFO, async: the loop never blocks). A Redis
    that does not answer in FAIR_REDIS_TIMEOUT_MS leaves the last values (and counts a Redis error):
    the scrape itself still succeeds."""
    if state.store is None:
        return
    try:
        async with asyncio.timeout(state.settings.redis_timeout_ms / 1000.0):
            used, maxmemory = await state.store.memory()
    except (StoreUnavailable, TimeoutError):
        return
    metrics.REDIS_USED_MEMORY.set(used)
    metrics.REDIS_MAXMEMORY.set(maxmemory)


@router.get(
    "/model",
    response_model=PublicModelResponse,
    responses=error_responses(500, 503),
    summary="The bundle being served (no file paths: those are on GET /admin/model)",
)
async def model_info(engine: ServingEngine) -> PublicModelResponse:
    return public_model_summary(engine)
