"""What every request must pass before a route sees it, in the order a stranger meets it.

1. a path that is valid UTF-8 (422; this middleware, before routing),
2. the token of the route's guard (401; the route class, service/auth.py): after routing, before the
   body is read, so strangers get nothing parsed and no route can be forgotten by a path list,
3. shedding (429; ``InferenceRoute``) when the batcher cannot answer within the request deadline,
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
import time
import urllib.parse

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.auth import DataPlaneRoute
from service.errors import ServiceError, overloaded


class InferenceRoute(DataPlaneRoute):
    """A data-plane route that waits for the batcher: shed (429) before its body is read when it
    cannot be answered within the request deadline."""

    def admit(self, request: Request) -> ServiceError | None:
        reason = request.app.state.fair.shed_reason()
        return overloaded("overloaded", reason) if reason is not None else None


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float):
        self.app, self.max_body_bytes, self.body_timeout_s = app, max_body_bytes, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
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
            await self.app(scope, self._limited(scope, receive), send_wrapper)
        finally:
            # the route template (set by the router), so the series stay few
            path = getattr(scope.get("route"), "path", "unmatched")
            metrics.request_duration(path, str(status)).observe(time.perf_counter() - start)

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
