"""One JSON error envelope for every failure: ``{"error": {"code", "message"[, "field"]}}``.

Clients branch on ``code`` (stable, snake_case), humans read ``message``; a stack trace never leaves
the process (it goes to the log).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics

log = logging.getLogger("fair.errors")

RETRY_AFTER_S = 1


class ServiceError(Exception):
    """An expected failure with its HTTP status, stable code and message.

    ``reject_reason`` is the ``reason`` label of ``fair_requests_rejected_total`` this failure counts
    under (None: not counted); it is counted once, when the error becomes the response, so no raise
    site bumps the counter by hand.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        reject_reason: str | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}
        self.reject_reason = reject_reason

    def to_response(self) -> JSONResponse:
        if self.reject_reason is not None:
            metrics.REQUESTS_REJECTED.labels(reason=self.reject_reason).inc()
        return error_response(self.status, self.code, self.message, self.field, self.headers)


class InvalidBody(StarletteHTTPException):
    """A body refused while it is parsed, before its model is validated (service/api/json_body.py: a
    duplicated JSON key): 422 ``invalid_request`` naming the field, like a validation error.

    An HTTPException because FastAPI lets exactly those through from the body parse (any other
    exception there becomes its generic 400 "error parsing the body", which names nothing)."""

    def __init__(self, field: str, message: str):
        super().__init__(422, message)
        self.field = field


def unavailable(code: str, message: str, reject_reason: str | None = None) -> ServiceError:
    """503 with Retry-After: the condition (Redis down, no model yet) is expected to pass."""
    return ServiceError(
        503, code, message, headers={"Retry-After": str(RETRY_AFTER_S)}, reject_reason=reject_reason
    )


def overloaded(code: str, message: str) -> ServiceError:
    """429 with Retry-After: shed now so the client retries elsewhere or later."""
    return ServiceError(429, code, message, headers={"Retry-After": str(RETRY_AFTER_S)}, reject_reason=code)


def envelope(code: str, message: str, field: str | None = None) -> dict:
    error = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return {"error": error}


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers=None
) -> JSONResponse:
    return JSONResponse(envelope(code, message, field), status_code=status, headers=headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the envelope."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return exc.to_response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        # a JSON syntax error's loc is ("body", character offset): the field is the body itself
        field = "body" if first.get("type") == "json_invalid" else ".".join(loc) or "body"
        metrics.REQUESTS_REJECTED.labels(reason="invalid").inc()
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        return error_response(422, "invalid_request", f"{field}: {first.get('msg', 'invalid')}{more}", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, InvalidBody):
            metrics.REQUESTS_REJECTED.labels(reason="invalid").inc()
            return error_response(422, "invalid_request", f"{exc.field}: {exc.detail}", exc.field)
        if exc.status_code == 400:
            # FastAPI's "error parsing the body" (invalid UTF-8, JSON nested past the parser's depth):
            # the same answer as any other invalid body, the 422 every route documents.
            metrics.REQUESTS_REJECTED.labels(reason="invalid").inc()
            return error_response(422, "invalid_request", f"body: {exc.detail}", "body")
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal server error (see the service log)")
