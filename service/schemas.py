"""Request and response bodies of the HTTP API (pydantic; FastAPI derives the OpenAPI schema from them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from service.settings import MAX_BEAM_SIZE, MAX_K, MAX_REQUEST_HISTORY

# Printable, bounded ids: they end up in Redis keys and logs.
UserId = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]
ItemId = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]


def whole_number(value: object) -> object:
    """A JSON number with no fractional part (``20.0``, ``2e1``) as the int it is; anything else as sent.

    The schema says ``type: integer``, which JSON Schema (2020-12, OpenAPI 3.1) defines as any number
    whose fractional part is zero: ``20.0`` is an integer there, and refusing it refused what the schema
    allows. The fields stay strict otherwise: ``20.5``, ``"20"`` and ``true`` are still refused.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: UserId
    # strict: JSON true is not 1, 0 is not false, "5" is not 5 (what the schema says is what is accepted);
    # 20.0 is 20 (JSON Schema's integer: ``whole_number``)
    k: int | None = Field(
        None,
        ge=1,
        le=MAX_K,
        strict=True,
        description="number of items to return (default FAIR_DEFAULT_K, 10)",
    )
    exclude_seen: bool = Field(True, strict=True, description="never recommend an item of the user's history")
    beam_size: int | None = Field(
        None,
        ge=1,
        strict=True,
        le=MAX_BEAM_SIZE,
        description="beam width of the constrained search (default FAIR_DEFAULT_BEAM_SIZE); raised to k if smaller",
    )
    history: list[ItemId] | None = Field(
        None,
        max_length=MAX_REQUEST_HISTORY,
        description="item ids, oldest first; when given, used instead of the user's Redis history",
    )

    _whole_numbers = field_validator("k", "beam_size", mode="before")(whole_number)


class RecommendedItem(BaseModel):
    item_id: str
    score: float | None = Field(description="summed log-probability of the code tuple; null for fallbacks")
    semantic_id: list[int]


class RecommendResponse(BaseModel):
    user_id: str
    model_version: int
    items: list[RecommendedItem]
    fallback: Literal["popular"] | None = None


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_ids: list[ItemId] = Field(min_length=1, max_length=MAX_REQUEST_HISTORY)


class EventsResponse(BaseModel):
    user_id: str
    history_length: int


class HistoryResponse(BaseModel):
    user_id: str
    item_ids: list[str]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    fallback_from: list[int] | None = Field(
        None,
        description="present only when an older bundle version is served because these newer ones failed "
        "to load (startup fallback, or the poller), newest first; GET /admin/model says why",
    )


class ReadyResponse(BaseModel):
    ready: bool
    checks: dict[str, bool]


class PublicModelResponse(BaseModel):
    name: str
    version: int
    provider: str
    loaded_at: str
    manifest: dict = Field(description="the bundle manifest without its file checksums and file-system paths")


class RefusedVersion(BaseModel):
    version: int
    reason: str = Field(
        description="signature, checksum, limit, unsafe_files, invalid or runtime (fair_bundles_refused_total)"
    )
    message: str = Field(description="the error, with file paths")


class ModelResponse(BaseModel):
    name: str
    version: int
    provider: str
    path: str = Field(description="the bundle directory")
    loaded_at: str
    manifest: dict = Field(description="the bundle manifest without its file checksums")
    pinned_version: int | None = Field(
        None,
        description="the version pinned by POST /admin/reload {version} (bundle polling paused); null: none",
    )
    fallback_from: list[RefusedVersion] = Field(
        default_factory=list,
        description="newer versions that failed to load (at startup, or when the poller tried them), newest "
        "first: why an older version is served; empty when the newest loadable version is the newest",
    )


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="load and pin this version: bundle polling leaves it alone until a reload without a "
        "version, which loads the newest present and releases the pin",
    )

    _whole_numbers = field_validator("version", mode="before")(whole_number)


class ReloadResponse(BaseModel):
    name: str
    version: int
    previous_version: int | None
    provider: str
    changed: bool
    pinned_version: int | None = Field(
        None, description="the manually pinned version after this reload; null: none"
    )


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*statuses: int) -> dict:
    """OpenAPI ``responses=`` entries for the error statuses a route can return."""
    descriptions = {
        401: "missing or wrong bearer token (FAIR_ADMIN_TOKEN on /admin/*, FAIR_API_TOKENS elsewhere)",
        408: "the request body was not received within FAIR_BODY_TIMEOUT_MS; the connection is closed",
        404: "not found (admin routes: admin disabled, or no such bundle version)",
        409: "reload: the new bundle failed to load, verify or warm up (the old one keeps serving); "
        "events: the Idempotency-Key was already used with other items",
        413: "request body over FAIR_MAX_BODY_BYTES",
        422: "invalid request (also: a body that is not JSON, a path that is not UTF-8; events: an item id the "
        "served catalog does not know, code unknown_item); error.field names the offending field",
        429: "overloaded: the request could not be answered within its deadline, or the queue is full (Retry-After set)",
        500: "unexpected error",
        503: "Redis unreachable or full (redis_full: at maxmemory, writes refused), or no model ready "
        "(Retry-After set)",
        504: "request deadline (FAIR_REQUEST_TIMEOUT_MS) passed",
    }
    return {s: {"model": ErrorResponse, "description": descriptions[s]} for s in statuses}
