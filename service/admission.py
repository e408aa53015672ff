"""What every request must pass before a route sees it, in the order a stranger meets it.

0. its arrival is stamped (this middleware, its first ASGI call): the request deadline counts from it
   (service/overload.py says how the event loop's lag before that call is counted in),
1. a path that is valid UTF-8 (422; this middleware, before routing),
2. the token of the route's guard (401; the route class, service/auth.py): after routing, before the
   body is read, so strangers get nothing parsed and no route can be forgotten by a path list,
3. admission (429) of the inference routes (``InferenceRoute``), when the request cannot be answered
   within its deadline (service/overload.py): decided here, before routing and before the body is
   read, for the routes' fixed paths when the caller's token is valid (a stranger still gets the
   route's 401), answered with a few bytes written by this middleware; under a burst of thousands the
   refusal itself is what the event loop spends its time on, and FastAPI's routing and error handling
   cost 2-3x the bare refusal. A request that reaches an inference route undecided (a path with
   parameters) is decided by the route class instead,
4. the body size limit (413: announced by Content-Length, or counted as it streams; this middleware,
   when the route first reads the body),
5. the body-read deadline (408, connection closed; this middleware): a client that starts a body and
   never finishes it would hold its connection (a file descriptor) for good.

Pure ASGI (no BaseHTTPMiddleware): no extra task per request, and the body is counted as it streams,
so a chunked upload without Content-Length is cut off at the limit too. The middleware also records the
request duration by route template and status.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from contextvars import ContextVar

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.auth import DataPlaneRoute, Guard
from service.errors import RETRY_AFTER_S, ServiceError, envelope, overloaded
from service.overload import Admission, Ticket

# The admitted request's ticket (arrival, deadline), for the code that serves it (service/recommender.py):
# set in the request's own task, by this middleware or by the route class.
_TICKET: ContextVar[Ticket | None] = ContextVar("fair_admission_ticket", default=None)
ARRIVAL_KEY = "fair.arrival"  # the scope key of the arrival stamp (perf_counter seconds)


def current_ticket() -> Ticket | None:
    """The ticket of the request being served in this task; None outside an admitted request."""
    return _TICKET.get()


class InferenceRoute(DataPlaneRoute):
    """A data-plane route that waits for the batcher: admitted or refused (429) before its body is read.
    The middleware decides for the fixed paths; here only a request that reached the route undecided."""

    def admit(self, request: Request) -> ServiceError | None:
        if _TICKET.get() is not None:
            return None
        admission: Admission = request.app.state.admission
        ticket, refusal = admission.arrive(request.scope.get(ARRIVAL_KEY, time.perf_counter()))
        if refusal is not None:
            return overloaded("overloaded", refusal)
        _TICKET.set(ticket)  # the middleware (same task) reports it answered
        return None


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, admission: Admission, max_body_bytes: int, body_timeout_s: float):
        self.app, self.admission = app, admission
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s
        self._inference: dict[tuple[str, str], tuple[object, Guard | None]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = scope[ARRIVAL_KEY] = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if not _utf8_path(scope):
                # Starlette would decode the user id with U+FFFD replacements, so /users/%ff and
                # /users/%fe would share one history: refuse instead of merging users.
                refused = ServiceError(
                    422, "invalid_request", "path: percent-encoded bytes are not valid UTF-8", "path",
                    reject_reason="invalid",
                )  # fmt: skip
                await refused.to_response()(scope, receive, send_wrapper)
                return
            route = self._inference_route(scope)
            if route is not None:
                ticket, refusal = self.admission.arrive(start)
                if refusal is not None:
                    scope["route"] = route  # the duration metric's route template
                    await _refuse(send_wrapper, refusal)
                    return
                _TICKET.set(ticket)
            await self.app(scope, self._limited(scope, receive), send_wrapper)
        finally:
            ticket = _TICKET.get()  # set above, or by the route class in this same task
            if ticket is not None:
                self.admission.finish(ticket, status)
            # the route template (set by the router), so the series stay few
            path = getattr(scope.get("route"), "path", "unmatched")
            metrics.request_duration(path, str(status)).observe(time.perf_counter() - start)

    def _inference_route(self, scope: Scope) -> object | None:
        """The inference route this request is for, when its path is one of their fixed paths and its
        caller may call it (else None: routing, the guard and the route class decide as usual)."""
        if self._inference is None:
            self._inference = {
                (method, route.path): (route, route.guard)
                for route in _walk(scope["app"].routes)
                if isinstance(route, InferenceRoute) and "{" not in route.path
                for method in route.methods or ()
            }
        found = self._inference.get((scope["method"], scope["path"]))
        if found is None:
            return None
        route, guard = found
        if self.admission.state.tokens.check_scope(guard, scope) is not None:
            return None  # the route answers 401
        return route

    def _limited(self, scope: Scope, receive: Receive) -> Receive:
        """``receive`` cut off at the body size limit (413) and the body-read deadline (408)."""
        limit, timeout_s = self.max_body_bytes, self.body_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s
        received = 0
        announced = _content_length(scope)

        async def limited_receive() -> Message:
            nonlocal received
            if announced is not None and announced > limit:
                metrics.REQUESTS_REJECTED.labels(reason="body_too_large").inc()
                raise HTTPException(413, f"request body of {announced} bytes exceeds {limit} bytes")
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                metrics.REQUESTS_REJECTED.labels(reason="body_timeout").inc()
                raise HTTPException(
                    408,
                    f"request body not received within {timeout_s * 1000:g} ms",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    metrics.REQUESTS_REJECTED.labels(reason="body_too_large").inc()
                    raise HTTPException(413, f"request body exceeds {limit} bytes")
            return message

        return limited_receive


def _walk(routes) -> list:
    """Every route, those of included routers too (recent FastAPI releases keep an included router as
    one entry, its routes under ``original_router``; older ones flatten them)."""
    found = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        found += _walk(inner.routes) if inner is not None else [route]
    return found


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _utf8_path(scope: Scope) -> bool:
    raw = scope.get("raw_path")
    if not raw or b"%" not in raw:
        return True  # the HTTP parser only lets ASCII through unescaped
    try:
        urllib.parse.unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_OVERLOADED = metrics.REQUESTS_REJECTED.labels(reason="overloaded")
_REFUSAL_HEADERS = [(b"content-type", b"application/json"), (b"retry-after", str(RETRY_AFTER_S).encode())]


async def _refuse(send: Send, message: str) -> None:
    """429 ``overloaded`` + Retry-After, the envelope of service/errors.py, written directly: the
    body is never read and nothing of FastAPI runs."""
    _OVERLOADED.inc()
    body = json.dumps(envelope("overloaded", message), separators=(",", ":")).encode()
    headers = [*_REFUSAL_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})
