"""The HTTP edge: what a connection may cost before the application sees a request.

uvicorn (with httptools) bounds none of it: a request head (request line + headers) may be any size
and take any time (httptools grows each header by concatenation, so one 64 MB header grew the server
by 65 MB and stalled the event loop for seconds), a connection that never sends a byte is never
closed, and ``limit_concurrency`` only answers 503 once a head is complete. ``EdgeProtocol`` is
uvicorn's httptools protocol with those limits added, in-process (no proxy needed in front):

* ``FAIR_MAX_CONNECTIONS``: open connections per worker; the next one is answered 503 at accept and
  closed before anything is read (file descriptors and per-connection memory stay bounded);
* ``FAIR_HEADER_TIMEOUT_S``: a head must be complete within this of the connection opening, or of the
  first byte after the previous request (slow or idle clients: 408 if part of a head arrived, else a
  plain close); the same bound covers the rest of a body that still arrives after its response;
* ``FAIR_MAX_HEADER_BYTES``: a head larger than this is answered 431 and closed; the parser is never
  fed more than this of one head, so memory per connection is bounded by it;
* ``FAIR_MAX_HEADERS``: more header fields than this: 431 and closed;
* ``FAIR_KEEP_ALIVE_S``: an idle keep-alive connection is closed after this (uvicorn's own timer).

Everything else (the request and its body, the deadline, admission) is uvicorn's and the app's as
before. Refusals are counted in ``fair_edge_refused_total{reason}``; ``fair_http_connections`` is the
number of open connections (summed over workers), to compare with the cap.

``fair-serve`` selects the protocol by import path (``uvicorn_options``), so every worker process
builds its limits from the same ``FAIR_*`` environment as its app (``Settings()``, once per process).
The subclass uses uvicorn's parser callbacks (``on_message_begin`` ... ``on_message_complete``) and
``on_response_complete``; tests/service/test_service_edge.py checks each limit on raw sockets against a
real ``fair-serve``, so an uvicorn upgrade that changes them fails there, not in production.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Settings

log = logging.getLogger("fair.edge")

EDGE_REFUSE_REASONS = ("max_connections", "header_timeout", "header_too_large", "too_many_headers")
EDGE_REFUSED = Counter(
    "fair_edge_refused_total",
    "Connections closed by the HTTP edge before a request reached the app, by reason "
    "(max_connections, header_timeout, header_too_large, too_many_headers)",
    ["reason"],
)
HTTP_CONNECTIONS = Gauge(
    "fair_http_connections", "Open HTTP connections (all workers)", multiprocess_mode="livesum"
)
# file descriptors a worker needs besides its client connections (Redis pool, bundle files, logs)
FD_RESERVE = 256
_WARN_EVERY_S = 60.0


@dataclass(frozen=True)
class EdgeLimits:
    header_timeout_s: float
    max_header_bytes: int
    max_headers: int
    max_connections: int

    @classmethod
    def from_settings(cls, s: Settings) -> EdgeLimits:
        return cls(s.header_timeout_s, s.max_header_bytes, s.max_headers, s.max_connections)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn.run() arguments of the edge (the protocol reads the rest from the environment)."""
    return {
        "http": f"{__name__}:EdgeProtocol",
        "timeout_keep_alive": settings.keep_alive_s,  # uvicorn types it int; call_later takes a float
    }


def ensure_fd_limit(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE (up to the hard limit) so ``max_connections`` can be reached;
    returns the soft limit now in force. Below the cap the process would run out of descriptors first
    (accept() fails with EMFILE and asyncio stops accepting for a while), so the cap would not be what
    bounds it: say so in the log rather than pretend."""
    need = max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # not allowed here: keep the old limit, warn below
            log.debug("could not raise RLIMIT_NOFILE to %d: %s", target, exc)
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "open-file limit %d is below FAIR_MAX_CONNECTIONS %d + %d reserved: the descriptor limit, "
            "not the connection cap, bounds connections (raise `ulimit -n`)",
            soft,
            max_connections,
            FD_RESERVE,
        )
    return int(soft)


def _response(status: int, reason: str, code: str, message: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 answer in the service's error envelope, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n"
    )
    return head.encode("ascii") + body


@functools.cache
def _answers(limits: EdgeLimits) -> dict[str, bytes]:
    return {
        "max_connections": _response(
            503, "Service Unavailable", "too_many_connections",
            f"this worker has FAIR_MAX_CONNECTIONS={limits.max_connections} connections open; retry",
            extra="retry-after: 1\r\n",
        ),
        "header_timeout": _response(
            408, "Request Timeout", "header_timeout",
            f"request head not received within FAIR_HEADER_TIMEOUT_S={limits.header_timeout_s:g} s",
        ),
        "header_too_large": _response(
            431, "Request Header Fields Too Large", "header_too_large",
            f"request line and headers exceed FAIR_MAX_HEADER_BYTES={limits.max_header_bytes} bytes",
        ),
        "too_many_headers": _response(
            431, "Request Header Fields Too Large", "too_many_headers",
            f"more than FAIR_MAX_HEADERS={limits.max_headers} header fields",
        ),
    }  # fmt: skip


@functools.cache
def _limits_from_environment() -> EdgeLimits:
    """Once per worker process: the same ``FAIR_*`` environment its app is built from."""
    for reason in EDGE_REFUSE_REASONS:  # every series visible (at 0) before its first event
        EDGE_REFUSED.labels(reason=reason)
    return EdgeLimits.from_settings(Settings())


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a connection cap, a head deadline and head size/count limits.

    State per connection: ``_reading_head`` is true while the next bytes belong to a request head (from
    the connection opening, and again once a request has been received whole), ``_head_room`` how many
    more bytes that head may have, ``_timer`` the deadline of the head in progress (or of the rest of a
    body the app answered without reading). Bytes are counted before they reach the parser, and the
    parser is fed at most ``max_header_bytes`` of one head. Only bytes of a head that the previous
    request's last read already contained (HTTP pipelining) escape the count, at most one read (256 KiB).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = _limits_from_environment()
        self._answers = _answers(self.limits)
        self._reading_head = True
        self._head_room = self.limits.max_header_bytes
        self._heads_done = 0
        self._message_done = True
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._counted = False

    # ---- connection ----
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport  # connection_lost needs it; never added to self.connections
            self._refuse("max_connections")
            return
        super().connection_made(transport)
        HTTP_CONNECTIONS.inc()
        self._counted = True
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._counted:
            HTTP_CONNECTIONS.dec()
            self._counted = False
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        while self._reading_head and len(data) > self._head_room:
            n, heads = self._head_room, self._heads_done
            super().data_received(data[:n])
            data = data[n:]
            if self._refused or self.transport.is_closing():
                return
            if self._heads_done == heads:  # the head in progress is still incomplete after the limit
                self._refuse("header_too_large")
                return
        if self._reading_head:
            self._head_room -= len(data)
        super().data_received(data)
        # Header fields are counted after each read, not per field (a Python call per field costs more
        # than the check): a head still incomplete never holds more than max_headers fields past a read.
        if self._reading_head and self.headers is not None and len(self.headers) > self.limits.max_headers:
            if not self._refused:
                self._refuse("too_many_headers")
            return
        # A head left incomplete by this read (begun, or only a bare CRLF so far) starts its deadline
        # here. Checked after the read, so the usual request whose head arrives in one read costs no
        # timer at all (a timer per request is measurable at thousands of requests per second).
        if (
            self._timer is None
            and self._head_in_progress()
            and not self._refused
            and not self.transport.is_closing()
        ):
            self._arm()

    def _head_in_progress(self) -> bool:
        """Some of the next request's head has arrived (its first line, or only a bare CRLF)."""
        return self._reading_head and (
            not self._message_done or self._head_room < self.limits.max_header_bytes
        )

    # ---- parser callbacks (uvicorn's, guarded) ----
    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._message_done = False
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        if len(self.headers) > self.limits.max_headers:
            self._refuse("too_many_headers")
            return
        self._disarm()
        self._reading_head = False
        self._heads_done += 1
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._message_done = True
        self._reading_head, self._head_room = True, self.limits.max_header_bytes
        if self._timer is not None:  # the rest of a body answered early has arrived: idle from here
            self._disarm()
            if self.cycle is not None and self.cycle.response_complete and not self.transport.is_closing():
                # uvicorn armed its keep-alive timer at the response, and the body bytes since then
                # cancelled it: arm it again, or this connection would idle for good
                self._unset_keepalive_if_required()
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # after a refusal the parser may still choke on the rest of that read
            super().send_400_response(msg)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        answered_early = self.cycle is not None and self.cycle.response_complete and not self._message_done
        if answered_early and not self.transport.is_closing() and self._timer is None:
            # the app answered (413, 401, ...) before the body arrived: the rest of it gets the head's
            # deadline, or a client trickling a huge announced body would hold the connection for good
            self._arm()

    # ---- limits ----
    def _arm(self) -> None:
        self._timer = self.loop.call_later(self.limits.header_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._head_in_progress():
            self._refuse("header_timeout")  # part of a head arrived: say why (408)
        else:  # nothing of a head yet (or a response was already sent): just close
            _count("header_timeout")
            self.transport.close()

    def _refuse(self, reason: str) -> None:
        self._refused = True
        self._disarm()
        _count(reason)
        if not self.transport.is_closing():
            self.transport.write(self._answers[reason])
            self.transport.close()


_last_warned: dict[str, float] = {}


def _count(reason: str) -> None:
    """Count a refusal; log it at most once a minute per reason (an attack must not flood the log)."""
    EDGE_REFUSED.labels(reason=reason).inc()
    now = time.monotonic()
    if now - _last_warned.get(reason, -_WARN_EVERY_S) >= _WARN_EVERY_S:
        _last_warned[reason] = now
        log.warning("HTTP edge closed a connection: %s (fair_edge_refused_total counts them all)", reason)
