"""The FastAPI application: routes, lifespan (Redis, model, batcher), middleware and hot reload.

``create_app(settings)`` builds a fresh app (tests build several); ``fair-serve`` runs it under
uvicorn, as a factory so every worker process builds its own. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from export.bundle import MANIFEST_FILE, list_versions
from service import errors, metrics
from service.batcher import Batcher, BatcherClosed, Job, Overloaded, QueueFull
from service.engine import Engine, load_engine, single_threaded_blas
from service.errors import ServiceError, unavailable
from service.redis_store import (
    EmbeddedRedis,
    HistoryStore,
    IdempotencyConflict,
    StoreUnavailable,
    async_client,
)
from service.redis_supervisor import RedisSupervisor
from service.schemas import (
    EventsRequest,
    EventsResponse,
    HealthResponse,
    HistoryResponse,
    ModelResponse,
    PublicModelResponse,
    ReadyResponse,
    RecommendRequest,
    RecommendResponse,
    ReloadRequest,
    ReloadResponse,
    error_responses,
)
from service.settings import Settings

log = logging.getLogger("fair.app")

GIL_SWITCH_INTERVAL_S = 0.0001  # see the lifespan

UserIdPath = Annotated[str, PathParam(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=128,
        pattern=r"^[\x21-\x7e]+$",
        description="any printable ASCII token (a UUID is fine): a write repeated with the same key "
        "(within FAIR_IDEMPOTENCY_TTL_S) is applied once and answered with the first answer",
    ),
]
# The public message of every Redis outage: the address and the driver's error go to the log only.
REDIS_UNAVAILABLE = "the history store (Redis) is unavailable; retry shortly"


@dataclass
class AppState:
    settings: Settings
    store: HistoryStore | None = None
    # the embedded server of FAIR_DATA_DIR when that is our Redis (started here, or by fair-serve and
    # handed down as its URL); None with an external Redis
    embedded: EmbeddedRedis | None = None
    supervisor: RedisSupervisor | None = None
    engine: Engine | None = None
    batcher: Batcher | None = None
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    poll_task: asyncio.Task | None = None
    failed_versions: set[int] = field(default_factory=set)

    @property
    def model_dir(self) -> Path | None:
        """``BUNDLE_ROOT/NAME``: where new versions appear (the parent of a pinned version dir)."""
        b = self.settings.bundle
        if b is None:
            return None
        return b.parent if (b / MANIFEST_FILE).is_file() else b

    @property
    def pinned(self) -> bool:
        b = self.settings.bundle
        return b is not None and (b / MANIFEST_FILE).is_file()


# ---- model loading ----------------------------------------------------------------------------------
def _load_and_warm(state: AppState, path: Path, version: int | None) -> Engine:
    s = state.settings
    engine = load_engine(
        path,
        version,
        providers=s.providers,
        intra_op_threads=s.intra_op_threads,
        inter_op_threads=s.inter_op_threads,
        allow_spinning=s.allow_spinning,
        verify=s.verify_bundle,
    )
    took = engine.warm_up(s.max_batch_size, s.default_beam_size, s.default_k)
    log.info("warmed up %s v%d in %.2fs", engine.name, engine.version, took)
    return engine


def _swap(state: AppState, engine: Engine) -> Engine | None:
    """Atomic for the event loop: new requests see the new engine; queued jobs keep their own."""
    old = state.engine
    previous = (old.name, str(old.version), old.provider) if old is not None else None
    state.engine = engine
    metrics.set_model_info(engine.name, engine.version, engine.provider, previous)
    return old


async def reload_model(state: AppState, version: int | None) -> tuple[Engine, Engine | None]:
    """Load + verify + warm a version off the event loop, then swap; on any failure keep the old one."""
    model_dir = state.model_dir
    if model_dir is None:
        raise ServiceError(409, "reload_failed", "no bundle configured (FAIR_BUNDLE)")
    async with state.reload_lock:
        if version is not None and version not in list_versions(model_dir):
            raise ServiceError(404, "bundle_not_found", f"{model_dir}: no version {version}")
        current = state.engine
        target = version if version is not None else (list_versions(model_dir) or [None])[-1]
        if current is not None and target == current.version and current.bundle.dir.parent == model_dir:
            return current, current
        try:
            engine = await asyncio.to_thread(_load_and_warm, state, model_dir, version)
        except Exception as exc:
            log.error("reload of %s (version %s) failed: %s", model_dir, version or "newest", exc)
            raise ServiceError(409, "reload_failed", f"{type(exc).__name__}: {exc}") from exc
        old = _swap(state, engine)
        log.info("now serving %s v%d (was v%s)", engine.name, engine.version, old.version if old else None)
        return engine, old


async def _poll_bundles(state: AppState) -> None:
    """Reload when a newer version appears under BUNDLE_ROOT/NAME (unless a version is pinned).

    Any other error (a network mount failing to list the bundle root) is logged and the next poll
    tries again: an exception escaping here would end polling for good and, re-raised at shutdown,
    skip draining the queue and stopping Redis.
    """
    while True:
        await asyncio.sleep(state.settings.bundle_poll_s)
        try:
            await _poll_once(state)
        except Exception:
            log.exception("poll: checking %s for new versions failed", state.model_dir)


async def _poll_once(state: AppState) -> None:
    model_dir = state.model_dir
    versions = list_versions(model_dir) if model_dir else []
    if not versions or state.engine is None:
        return
    newest = versions[-1]
    if newest > state.engine.version and newest not in state.failed_versions:
        try:
            await reload_model(state, newest)
        except ServiceError as exc:
            state.failed_versions.add(newest)  # don't retry a broken version every poll
            log.error("poll: version %d not loaded: %s", newest, exc.message)


# ---- lifespan -----------------------------------------------------------------------------------------
def _lifespan(state: AppState):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = state.settings
        metrics.init_series()
        # The event loop and the inference thread share the GIL. When one wants it back (ONNX Runtime
        # returned, or a request arrived), CPython makes the holder drop it only after the switch
        # interval (5 ms by default): under load each side stalls the other by up to that much per
        # hand-over. 0.1 ms: ~1,120 -> ~1,330 req/s closed-loop on the trained Beauty bundle, 1 worker
        # (wrk c=16, 2 runs each of 0.5 / 0.2 / 0.1 / 0.05 ms; 0.05 was no better than 0.1).
        previous_switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        blas = single_threaded_blas()
        url, embedded = s.redis_url, EmbeddedRedis(s.data_dir)
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
        )
        state.batcher = Batcher(s.max_batch_size, s.max_wait_ms, s.queue_size)
        try:
            if s.bundle is not None:
                _swap(state, await asyncio.to_thread(_load_and_warm, state, s.bundle, None))
            else:
                log.warning("no bundle configured (FAIR_BUNDLE): /recommend answers 503 until a reload")
            if s.bundle_poll_s > 0 and not state.pinned and s.bundle is not None:
                state.poll_task = asyncio.create_task(_poll_bundles(state))
            yield
        finally:
            if state.poll_task is not None:
                state.poll_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):  # cleanup must go on
                    await state.poll_task
            # Graceful shutdown: uvicorn has stopped accepting and waited for open requests; finish
            # whatever is still queued, then release Redis.
            await asyncio.to_thread(state.batcher.close)
            await state.store.close()
            if state.supervisor is not None:  # first, or stopping the server would look like a crash
                await asyncio.to_thread(state.supervisor.stop)
            if state.embedded is not None:
                await asyncio.to_thread(state.embedded.stop)  # a no-op unless we started it
            sys.setswitchinterval(previous_switch_interval)
            blas.restore_original_limits()

    return lifespan


# ---- middleware -------------------------------------------------------------------------------------
class RequestMiddleware:
    """Request-duration metrics by route template + status, and what every request must respect
    before a route sees it: the body size limit (413), the body-read deadline (408), a path that
    is valid UTF-8 (422), the data-plane token (401, when ``FAIR_API_TOKENS`` is set), and shedding
    load (429) when ``shed(scope)`` says the request cannot be answered in time: all before the body
    is read and validated, so a refused request costs the event loop as little as possible.

    Pure ASGI (no BaseHTTPMiddleware): no extra task per request, and the body is counted as it
    streams, so a chunked upload without Content-Length is cut off at the limit too. A client that
    starts a body and never finishes it would hold its connection (a file descriptor) for good: past
    ``body_timeout_s`` it gets 408 and the connection is closed.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        body_timeout_s: float,
        routes_of: FastAPI,
        shed: Callable[[Scope], str | None],
        authorized: Callable[[Scope], bool],
    ):
        self.app, self.max_body_bytes, self.routes_of = app, max_body_bytes, routes_of
        self.body_timeout_s, self.shed, self.authorized = body_timeout_s, shed, authorized

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None:
            return getattr(route, "path", "unmatched")
        for r in self.routes_of.router.routes:  # not routed yet (early 413): match it ourselves
            if r.matches(scope)[0] == Match.FULL:
                return getattr(r, "path", "unmatched")
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        limit = self.max_body_bytes

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if not _utf8_path(scope):
                # Starlette would decode the user id with U+FFFD replacements, so /users/%ff and
                # /users/%fe would share one history: refuse instead of merging users.
                metrics.REQUESTS_REJECTED.labels(reason="invalid").inc()
                resp = errors.error_response(
                    422, "invalid_request", "path: percent-encoded bytes are not valid UTF-8", "path"
                )
                await resp(scope, receive, send_wrapper)
                return
            if not self.authorized(scope):  # before the body: strangers get nothing parsed
                await _unauthorized("FAIR_API_TOKENS").to_response()(scope, receive, send_wrapper)
                return
            if (reason := self.shed(scope)) is not None:
                metrics.REQUESTS_REJECTED.labels(reason="overloaded").inc()
                resp = errors.error_response(429, "overloaded", reason, headers={"Retry-After": "1"})
                await resp(scope, receive, send_wrapper)
                return
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                metrics.REQUESTS_REJECTED.labels(reason="body_too_large").inc()
                resp = errors.error_response(
                    413, "body_too_large", f"request body of {int(length)} bytes exceeds {limit} bytes"
                )
                await resp(scope, receive, send_wrapper)
                return
            received = 0
            body_deadline = asyncio.get_running_loop().time() + self.body_timeout_s

            async def limited_receive() -> Message:
                nonlocal received
                try:
                    async with asyncio.timeout_at(body_deadline):
                        message = await receive()
                except TimeoutError:
                    metrics.REQUESTS_REJECTED.labels(reason="body_timeout").inc()
                    raise HTTPException(
                        408,
                        f"request body not received within {self.body_timeout_s * 1000:g} ms",
                        headers={"Connection": "close"},
                    ) from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        metrics.REQUESTS_REJECTED.labels(reason="body_too_large").inc()
                        raise HTTPException(413, f"request body exceeds {limit} bytes")
                return message

            await self.app(scope, limited_receive, send_wrapper)
        finally:
            metrics.request_duration(self._route(scope), str(status)).observe(time.perf_counter() - start)


# ---- the app ------------------------------------------------------------------------------------------
def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = AppState(settings=settings)
    app = FastAPI(
        title="FAIR recommendation service",
        version="1",
        description="Generative recommendation with FAIR: Redis histories -> ONNX Runtime -> constrained beam search.",
        lifespan=_lifespan(state),
    )
    app.state.fair = state
    errors.install(app)
    timeout_s = settings.request_timeout_ms / 1000.0

    def shed(scope: Scope) -> str | None:
        """A /recommend that would wait longer than the whole deadline: refuse before parsing it."""
        if scope["path"] != "/recommend" or state.batcher is None:
            return None
        wait = state.batcher.expected_wait_s()
        if wait <= timeout_s:
            return None
        return f"overloaded: expected wait {wait * 1000:.0f} ms exceeds the {timeout_s * 1000:g} ms deadline"

    api_secrets = [t.get_secret_value().encode() for t in settings.api_tokens]

    def authorized(scope: Scope) -> bool:
        path = scope["path"]
        if not api_secrets or (path != "/recommend" and not path.startswith("/users/")):
            return True
        scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and _token_matches(given.strip(), api_secrets)

    app.add_middleware(
        RequestMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_ms / 1000.0,
        routes_of=app,
        shed=shed,
        authorized=authorized,
    )
    # The middleware checks the token (before the body is read); this only declares the scheme in OpenAPI.
    data_plane = [Depends(_bearer_scheme("apiToken", "FAIR_API_TOKENS"))] if settings.api_tokens else []

    def require_store() -> HistoryStore:
        assert state.store is not None, "lifespan not started"
        return state.store

    @app.post(
        "/recommend",
        response_model=RecommendResponse,
        responses=error_responses(*_auth(settings), 408, 413, 422, 429, 500, 503, 504),
        summary="Top-k items for a user (Redis history) or for a given history",
        dependencies=data_plane,
    )
    async def recommend(body: RecommendRequest) -> Response:
        t_start = time.perf_counter()
        engine = state.engine
        if engine is None:
            metrics.REQUESTS_REJECTED.labels(reason="no_model").inc()
            raise unavailable("no_model", "no model loaded yet")
        timing: dict[str, float] = {}
        k = body.k or settings.default_k
        try:
            async with asyncio.timeout(timeout_s):
                if body.history is not None:
                    raw = body.history
                else:
                    t0 = time.perf_counter()
                    try:
                        raw = await require_store().get(body.user_id)
                    except StoreUnavailable as exc:
                        metrics.REQUESTS_REJECTED.labels(reason="redis_unavailable").inc()
                        raise unavailable("redis_unavailable", REDIS_UNAVAILABLE) from exc
                    timing["redis"] = time.perf_counter() - t0
                    metrics.stage("redis").observe(timing["redis"])
                index = engine.item_index
                known = [index[i] for i in raw if i in index]
                if len(known) < len(raw):
                    metrics.UNKNOWN_ITEMS.inc(len(raw) - len(known))
                exclude = (
                    np.unique(np.asarray(known, dtype=np.int64)) if body.exclude_seen and known else None
                )
                if not known:
                    reason = "unknown_user" if not raw else "no_known_items"
                    metrics.FALLBACK.labels(reason=reason).inc()
                    items = _items_json(engine, engine.bundle.popular[:k], None)  # nothing known to exclude
                    fallback = "popular"
                else:
                    job = Job(
                        engine=engine,
                        user_id=body.user_id,
                        history=np.asarray(known, dtype=np.int64),
                        exclude=exclude,
                        k=k,
                        beam_size=body.beam_size or settings.default_beam_size,
                        future=asyncio.get_running_loop().create_future(),
                        loop=asyncio.get_running_loop(),
                    )
                    try:
                        time_left = timeout_s - (time.perf_counter() - t_start)
                        result = await state.batcher.submit(job, time_left)
                    except Overloaded as exc:
                        metrics.REQUESTS_REJECTED.labels(reason="overloaded").inc()
                        raise ServiceError(429, "overloaded", str(exc), headers={"Retry-After": "1"}) from exc
                    except QueueFull as exc:
                        metrics.REQUESTS_REJECTED.labels(reason="queue_full").inc()
                        raise ServiceError(429, "queue_full", str(exc), headers={"Retry-After": "1"}) from exc
                    except BatcherClosed as exc:
                        raise unavailable("shutting_down", str(exc)) from exc
                    metrics.stage("queue_wait").observe(job.queue_wait)
                    timing.update(
                        queue_wait=job.queue_wait, inference=job.inference, beam_search=job.beam_search
                    )
                    items = _items_json(engine, result.items, result.scores)
                    fallback = None
        except TimeoutError as exc:
            metrics.REQUESTS_REJECTED.labels(reason="timeout").inc()
            raise ServiceError(
                504, "timeout", f"no answer within {settings.request_timeout_ms:g} ms"
            ) from exc
        timing["total"] = time.perf_counter() - t_start
        # The same JSON that ``RecommendResponse`` would give, written directly: FastAPI's
        # response-model validation + serialisation cost more per request than the model itself.
        content = (
            f'{{"user_id":{_json(body.user_id)},"model_version":{engine.version},'
            f'"items":[{items}],"fallback":{_json(fallback)}}}'
        ).encode()
        server_timing = ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in timing.items())
        return Response(content, media_type="application/json", headers={"Server-Timing": server_timing})

    @app.post(
        "/users/{user_id}/events",
        response_model=EventsResponse,
        responses=error_responses(*_auth(settings), 408, 409, 413, 422, 500, 503, 504),
        summary="Append items to a user's history (append + trim atomically, at most once per Idempotency-Key)",
        dependencies=data_plane,
    )
    async def add_events(
        user_id: UserIdPath, body: EventsRequest, idempotency_key: IdempotencyKey = None
    ) -> JSONResponse:
        write = require_store().append(user_id, body.item_ids, idempotency_key, settings.idempotency_ttl_s)
        try:
            result = await _redis_call(write, timeout_s)
        except IdempotencyConflict as exc:
            raise ServiceError(409, "idempotency_conflict", str(exc), field="Idempotency-Key") from exc
        replayed = result.replayed and idempotency_key is not None  # not for the client library's own retry
        return JSONResponse(
            EventsResponse(user_id=user_id, history_length=result.length).model_dump(),
            headers={"Idempotent-Replayed": "true"} if replayed else None,
        )

    @app.get(
        "/users/{user_id}/history",
        response_model=HistoryResponse,
        responses=error_responses(*_auth(settings), 422, 500, 503, 504),
        summary="A user's stored history, oldest first",
        dependencies=data_plane,
    )
    async def get_history(user_id: UserIdPath) -> HistoryResponse:
        items = await _redis_call(require_store().get(user_id), timeout_s)
        return HistoryResponse(user_id=user_id, item_ids=items)

    @app.get(
        "/healthz",
        response_model=HealthResponse,
        responses=error_responses(500, 503),
        summary="Process alive; 503 when the embedded Redis died and could not be restarted (restart me)",
    )
    async def healthz() -> HealthResponse:
        if state.embedded is not None and state.embedded.given_up():
            # the reason (with file paths) is in the log and in FAIR_DATA_DIR/redis.failed, not here
            raise ServiceError(
                503, "redis_failed", "the embedded Redis died and could not be restarted; see the service log"
            )
        return HealthResponse()

    @app.get(
        "/readyz",
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse, "description": "not ready (Retry-After set)"}, 500: {}},
        summary="Model loaded and warmed up, Redis answering",
    )
    async def readyz() -> JSONResponse:
        try:
            async with asyncio.timeout(settings.redis_timeout_ms / 1000.0 * 2):
                redis_ok = await require_store().ping()
        except TimeoutError:
            redis_ok = False
        checks = {"model": state.engine is not None, "redis": redis_ok}
        ready = all(checks.values())
        return JSONResponse(
            {"ready": ready, "checks": checks},
            status_code=200 if ready else 503,
            headers=None if ready else {"Retry-After": str(errors.RETRY_AFTER_S)},
        )

    @app.get(
        "/metrics",
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition"}, 500: {}},
        summary="Prometheus metrics (all workers in multiprocess mode)",
    )
    async def metrics_endpoint() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get(
        "/model",
        response_model=PublicModelResponse,
        responses=error_responses(500, 503),
        summary="The bundle being served (no file paths: those are on GET /admin/model)",
    )
    async def model_info() -> PublicModelResponse:
        return _public_model_summary(_serving_engine(state))

    if settings.admin_token is not None:
        app.include_router(_admin_router(state))
    return app


def _serving_engine(state: AppState) -> Engine:
    if state.engine is None:
        raise unavailable("no_model", "no model loaded yet")
    return state.engine


def _bearer_scheme(scheme_name: str, setting: str) -> HTTPBearer:
    """An HTTP bearer security scheme as a dependency that checks nothing (``auto_error=False``)."""
    return HTTPBearer(auto_error=False, scheme_name=scheme_name, description=f"the token in {setting}")


def _bearer_check(tokens, scheme_name: str, setting: str):
    """A dependency accepting ``Authorization: Bearer <one of tokens>`` (constant-time compare), 401
    otherwise. Declared as an HTTP bearer security scheme, so OpenAPI clients see the requirement."""
    secrets = [t.get_secret_value().encode() for t in tokens]
    bearer = _bearer_scheme(scheme_name, setting)

    # a default, not Annotated[...]: this module's annotations are strings, and ``bearer`` is local
    def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        given = credentials.credentials.encode() if credentials is not None else b""
        if not _token_matches(given, secrets):
            raise _unauthorized(setting)

    return check


def _token_matches(given: bytes, secrets: list[bytes]) -> bool:
    # every token is compared (no early exit), so timing does not tell which one nearly matched
    return bool(sum(hmac.compare_digest(given, t) for t in secrets))


def _unauthorized(setting: str) -> ServiceError:
    return ServiceError(
        401, "unauthorized", f"this route needs Authorization: Bearer <a token of {setting}>",
        headers={"WWW-Authenticate": "Bearer"},
    )  # fmt: skip


def _auth(settings: Settings) -> tuple[int, ...]:
    """The 401 of the OpenAPI responses of data-plane routes, when API tokens are configured."""
    return (401,) if settings.api_tokens else ()


def _admin_router(state: AppState) -> APIRouter:
    check_token = _bearer_check([state.settings.admin_token], "adminToken", "FAIR_ADMIN_TOKEN")
    router = APIRouter(prefix="/admin", dependencies=[Depends(check_token)])

    @router.get(
        "/model",
        response_model=ModelResponse,
        responses=error_responses(401, 500, 503),
        summary="The bundle being served, with its directory and the manifest's source paths",
    )
    async def admin_model() -> ModelResponse:
        return _model_summary(_serving_engine(state))

    @router.post(
        "/reload",
        response_model=ReloadResponse,
        responses=error_responses(401, 404, 408, 409, 413, 422, 500),
        summary="Load, verify and warm a bundle version, then swap it in atomically",
    )
    async def reload(body: ReloadRequest | None = None) -> ReloadResponse:
        version = body.version if body is not None else None
        engine, old = await reload_model(state, version)
        return ReloadResponse(
            name=engine.name,
            version=engine.version,
            previous_version=old.version if old is not None else None,
            provider=engine.provider,
            changed=old is not engine,
        )

    return router


# ---- helpers ------------------------------------------------------------------------------------------
async def _redis_call(coro, timeout_s: float):
    try:
        async with asyncio.timeout(timeout_s):
            return await coro
    except StoreUnavailable as exc:
        metrics.REQUESTS_REJECTED.labels(reason="redis_unavailable").inc()
        raise unavailable("redis_unavailable", REDIS_UNAVAILABLE) from exc
    except TimeoutError as exc:
        metrics.REQUESTS_REJECTED.labels(reason="timeout").inc()
        raise ServiceError(504, "timeout", "redis did not answer in time") from exc


_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _items_json(engine: Engine, items: np.ndarray, scores: np.ndarray | None) -> str:
    """The ``items`` array of a ``RecommendResponse`` as JSON text, without the brackets.

    Each item's id and semantic ID are encoded once per engine (``Engine.item_json``); only the
    score is formatted per request (``repr`` of the float, as pydantic writes it).
    """
    parts = engine.item_json
    if scores is None:
        score_texts = ["null"] * len(items)
    else:  # non-finite -> null, as pydantic writes it
        score_texts = [_json(s) if math.isfinite(s) else "null" for s in scores.tolist()]
    return ",".join(parts(int(i), sc) for i, sc in zip(items.tolist(), score_texts, strict=True))


def _utf8_path(scope: Scope) -> bool:
    raw = scope.get("raw_path")
    if not raw or b"%" not in raw:
        return True  # the HTTP parser only lets ASCII through unescaped
    try:
        urllib.parse.unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _without_paths(value):
    """``value`` with every absolute file-system path removed (dict entries dropped, recursively)."""
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if not _is_path(v)}
    if isinstance(value, list):
        return [_without_paths(v) for v in value if not _is_path(v)]
    return value


def _is_path(value) -> bool:
    return isinstance(value, str) and (value.startswith("/") or value[1:3] in (":\\", ":/"))


def _public_model_summary(engine: Engine) -> PublicModelResponse:
    full = _model_summary(engine)
    return PublicModelResponse(
        **full.model_dump(exclude={"path", "manifest"}), manifest=_without_paths(full.manifest)
    )


def _model_summary(engine: Engine) -> ModelResponse:
    manifest = {k: v for k, v in engine.bundle.manifest.items() if k != "files"}
    return ModelResponse(
        name=engine.name,
        version=engine.version,
        provider=engine.provider,
        path=str(engine.bundle.dir),
        loaded_at=engine.loaded_at,
        manifest=manifest,
    )
