"""/admin/items: add items without retraining, list them, delete them (service/new_items.py does the
work). Mounted with the other admin routes (FAIR_ADMIN_TOKEN); ``service.new_items.install`` mounts it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from service.api.admin import AdminJSONRoute
from service.errors import ServiceError
from service.new_items import MAX_NEW_ITEMS, MAX_TEXT_CHARS, NewItemRecord, NewItems
from service.schemas import ErrorResponse, ItemId, error_responses

router = APIRouter(prefix="/admin", route_class=AdminJSONRoute)  # duplicated JSON keys: 422
ItemIdPath = Annotated[str, PathParam(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]

# 409 and 404 mean something of their own here: documented per route, not with the shared wording
_409: dict[int | str, dict[str, Any]] = {
    409: {
        "model": ErrorResponse,
        "description": "nothing stored: item_in_bundle (the served bundle has this id), item_exists (added "
        "before with another text: DELETE it first), no_item_encoder (the served bundle was exported without "
        "--item-encoder), semantic_id_full (every collision code of the item's semantic-ID prefix is taken), "
        f"too_many_new_items (over {MAX_NEW_ITEMS})",
    }
}
_404: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "unknown_new_item: not an item added with POST /admin/items"}
}


class NewItemRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: ItemId
    text: str = Field(
        min_length=1,
        max_length=MAX_TEXT_CHARS,
        description="the item's text, written as the catalog's item texts are (the dataset's item_texts(): "
        "'title: ...; brand: ...; categories: ...'): the bundle's text encoder embeds it and its quantizer "
        "gives the semantic ID",
    )


class NewItemStatus(BaseModel):
    item_id: str
    text: str
    seq: int = Field(description="order of addition (the collision codes of a shared prefix follow it)")
    added_at: str
    status: Literal["served", "in_bundle", "not_served"] = Field(
        description="served: recommendable in this worker; in_bundle: the served bundle has this id (its "
        "version wins); not_served: see reason"
    )
    semantic_id: list[int] | None = Field(
        None, description="its code tuple in the served bundle (served only)"
    )
    reason: str | None = None


class NewItemResponse(NewItemStatus):
    created: bool = Field(description="false: the same item with the same text was there already (no change)")
    model_version: int


class NewItemList(BaseModel):
    model_version: int | None
    items: list[NewItemStatus]


class DeletedItem(BaseModel):
    item_id: str
    deleted: Literal[True] = True


async def _registry(request: Request) -> NewItems:
    registry = getattr(request.app.state, "new_items", None)
    if registry is None:  # pragma: no cover - install() sets it with the routes
        raise ServiceError(503, "not_ready", "new items are not set up in this worker")
    return registry


Registry = Annotated[NewItems, Depends(_registry)]


def _status(record: NewItemRecord, status) -> dict:
    return {
        "item_id": record.item_id,
        "text": record.text,
        "seq": record.seq,
        "added_at": record.added_at,
        "status": status.status,
        "semantic_id": list(status.semantic_id) if status.semantic_id is not None else None,
        "reason": status.reason,
    }


@router.post(
    "/items",
    response_model=NewItemResponse,
    status_code=201,
    responses={**error_responses(401, 408, 413, 422, 500, 503), **_409, 200: {"model": NewItemResponse}},
    summary="Add an item without retraining: its semantic ID and row from the bundle's own encoder",
    description="Stored in Redis (restored at restart) and served by every worker within a second, until "
    "a bundle that has the item itself is served (then the bundle's version wins). 201 when added, 200 "
    "when the same item with the same text was there already.",
)
async def add_item(body: NewItemRequest, registry: Registry, response: Response) -> NewItemResponse:
    record, status, created = await registry.add(body.item_id, body.text)
    if not created:
        response.status_code = 200
    engine = registry.state.serving()
    return NewItemResponse(**_status(record, status), created=created, model_version=engine.version)


@router.get(
    "/items",
    response_model=NewItemList,
    responses=error_responses(401, 500, 503),
    summary="The items added without retraining, in order of addition, with their status in this worker",
)
async def list_items(registry: Registry) -> NewItemList:
    items = await registry.listing()
    engine = registry.state.engine
    return NewItemList(
        model_version=engine.version if engine is not None else None,
        items=[NewItemStatus(**_status(r, s)) for r, s in items],
    )


@router.delete(
    "/items/{item_id}",
    response_model=DeletedItem,
    responses={**error_responses(401, 422, 500, 503), **_404},
    summary="Delete an item added without retraining (every worker drops it within a second)",
)
async def delete_item(item_id: ItemIdPath, registry: Registry) -> DeletedItem:
    await registry.remove(item_id)
    return DeletedItem(item_id=item_id)
