"""/admin/*: the bundle with its paths, and hot reload with a manual pin. Mounted only when
FAIR_ADMIN_TOKEN is set; every route is guarded by it (service/auth.py)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import ServingEngine, State
from service.api.json_body import UniqueKeysRoute
from service.auth import AdminRoute
from service.model_info import model_summary
from service.schemas import ModelResponse, RefusedVersion, ReloadRequest, ReloadResponse, error_responses
from service.state import manual_reload


class AdminJSONRoute(UniqueKeysRoute, AdminRoute):
    """AdminRoute, with a JSON body whose keys must be unique (service/api/json_body.py)."""


router = APIRouter(prefix="/admin", route_class=AdminJSONRoute)


@router.get(
    "/model",
    response_model=ModelResponse,
    responses=error_responses(401, 500, 503),
    summary="The bundle being served, with its directory and the manifest's source paths",
)
async def admin_model(engine: ServingEngine, state: State) -> ModelResponse:
    refused = [
        RefusedVersion(version=v, reason=r.reason, message=r.message)
        for v, r in state.fallback_from().items()
    ]
    return model_summary(engine, state.manual_pin, refused)


@router.post(
    "/reload",
    response_model=ReloadResponse,
    responses=error_responses(401, 404, 408, 409, 413, 422, 500),
    summary="Load, verify and warm a bundle version, then swap it in atomically",
)
async def reload(state: State, body: ReloadRequest | None = None) -> ReloadResponse:
    version = body.version if body is not None else None
    engine, old = await manual_reload(state, version)
    return ReloadResponse(
        name=engine.name,
        version=engine.version,
        previous_version=old.version if old is not None else None,
        provider=engine.provider,
        changed=old is not engine,
        pinned_version=state.manual_pin,
    )
