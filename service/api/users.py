"""A user's history: append events (idempotent), read it back."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import IdempotencyKey, State, Store, UserIdPath
from service.auth import DataPlaneRoute
from service.errors import ServiceError
from service.redis_calls import redis_call
from service.redis_store import IdempotencyConflict
from service.schemas import EventsRequest, EventsResponse, HistoryResponse, error_responses

router = APIRouter(prefix="/users", route_class=DataPlaneRoute)


@router.post(
    "/{user_id}/events",
    response_model=EventsResponse,
    responses=error_responses(408, 409, 413, 422, 500, 503, 504),
    summary="Append items to a user's history (append + trim atomically, at most once per Idempotency-Key)",
)
async def add_events(
    user_id: UserIdPath,
    body: EventsRequest,
    state: State,
    store: Store,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    s = state.settings
    write = store.append(user_id, body.item_ids, idempotency_key, s.idempotency_ttl_s)
    try:
        result = await redis_call(write, s.request_timeout_ms / 1000.0)
    except IdempotencyConflict as exc:
        raise ServiceError(409, "idempotency_conflict", str(exc), field="Idempotency-Key") from exc
    replayed = result.replayed and idempotency_key is not None  # not for the client library's own retry
    return JSONResponse(
        EventsResponse(user_id=user_id, history_length=result.length).model_dump(),
        headers={"Idempotent-Replayed": "true"} if replayed else None,
    )


@router.get(
    "/{user_id}/history",
    response_model=HistoryResponse,
    responses=error_responses(422, 500, 503, 504),
    summary="A user's stored history, oldest first",
)
async def get_history(user_id: UserIdPath, state: State, store: Store) -> HistoryResponse:
    items = await redis_call(store.get(user_id), state.settings.request_timeout_ms / 1000.0)
    return HistoryResponse(user_id=user_id, item_ids=items)
