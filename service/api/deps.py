"""Typed dependencies of the routes: the app state and what it holds, read from ``request.app.state``.

Async on purpose: FastAPI runs a sync dependency in the threadpool, a hop per request for a lookup.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi import Path as PathParam

from service.engine import Engine
from service.redis_store import HistoryStore
from service.state import AppState


async def _state(request: Request) -> AppState:
    return request.app.state.fair


State = Annotated[AppState, Depends(_state)]


async def _store(state: State) -> HistoryStore:
    assert state.store is not None, "lifespan not started"
    return state.store


Store = Annotated[HistoryStore, Depends(_store)]


async def _engine(state: State) -> Engine:
    return state.serving()


ServingEngine = Annotated[Engine, Depends(_engine)]

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
