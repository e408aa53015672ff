"""A user's history: append events (idempotent, only items of the served catalog), read it back."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service import metrics
from service.api.deps import IdempotencyKey, State, Store, UserIdPath
from service.api.json_body import UniqueKeysRoute
from service.auth import DataPlaneRoute
from service.errors import ServiceError
from service.redis_calls import redis_call
from service.redis_store import IdempotencyConflict
from service.schemas import EventsRequest, EventsResponse, HistoryResponse, error_responses
from service.state import AppState


class UsersRoute(UniqueKeysRoute, DataPlaneRoute):
    """DataPlaneRoute, with a JSON body whose keys must be unique (service/api/json_body.py)."""


router = APIRouter(prefix="/users", route_class=UsersRoute)


@router.post(
    "/{user_id}/events",
    response_model=EventsResponse,
    responses=error_responses(408, 409, 413, 422, 500, 503, 504),
    summary="Append items of the served catalog to a user's history (append + trim + expiry atomically, "
    "at most once per Idempotency-Key)",
)
async def add_events(
    user_id: UserIdPath,
    body: EventsRequest,
    state: State,
    store: Store,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    s = state.settings
    check_catalog(state, body.item_ids)
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


def check_catalog(state: AppState, item_ids: list[str]) -> None:
    """Refuse the whole write (422 ``unknown_item``, nothing stored) when an item id is not in the served
    bundle's catalog, and count those ids (``fair_events_unknown_items_total``).

    Without this anyone could fill Redis with arbitrary 256-byte strings that no model can use. The
    catalog is the engine serving now (a hot reload changes it between two requests, never within one);
    before the first bundle is loaded there is none to check against: 503 ``no_model``, as /recommend.
    """
    index = state.serving(reject_reason="no_model").item_index
    unknown = [n for n, item in enumerate(item_ids) if item not in index]
    if unknown:
        metrics.EVENTS_UNKNOWN_ITEMS.inc(len(unknown))
        first = unknown[0]
        raise ServiceError(
            422,
            "unknown_item",
            f"item_ids.{first}: {item_ids[first]!r} is not in the served catalog ({len(unknown)} of "
            f"{len(item_ids)} item ids unknown); nothing was stored",
            field=f"item_ids.{first}",
            reject_reason="invalid",
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
