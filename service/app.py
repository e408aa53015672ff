"""The FastAPI application factory.

``create_app(settings)`` builds a fresh app (tests build several); ``fair-serve`` runs it under uvicorn,
as a factory so every worker process builds its own. Where the rest lives: routes per resource in
service/api/, who may call them in service/auth.py, what a request must pass before a route reads its
body in service/admission.py, the state and hot reload in service/state.py, startup and shutdown in
service/lifespan.py. Nothing here imports torch.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI

from service import errors, new_items
from service.admission import AdmissionMiddleware
from service.api import admin, probes, recommend, users
from service.auth import guard_of
from service.lifespan import lifespan_of
from service.overload import Admission
from service.schemas import error_responses
from service.settings import Settings
from service.state import AppState


def create_app(settings: Settings | None = None) -> FastAPI:
    state = AppState.from_settings(settings or Settings())
    app = FastAPI(
        title="FAIR recommendation service",
        version="1",
        description="Generative recommendation with FAIR: Redis histories -> ONNX Runtime -> constrained beam search.",
        lifespan=lifespan_of(state),
    )
    app.state.fair = state
    errors.install(app)
    for router in (recommend.router, users.router, probes.router):
        _mount(app, state, router)
    if state.settings.admin_token is not None:  # unset: the admin routes do not exist
        _mount(app, state, admin.router)
    # items added by id and text without a new bundle (POST /admin/items; synced across workers)
    new_items.install(app)
    s = state.settings
    # the admission decisions of /recommend (service/overload.py); the route class reads it from here
    app.state.admission = Admission(
        state, s.request_timeout_ms / 1000.0, s.admission_share, s.max_in_flight, s.max_batch_size
    )
    app.add_middleware(
        AdmissionMiddleware,
        admission=app.state.admission,
        max_body_bytes=state.settings.max_body_bytes,
        body_timeout_s=state.settings.body_timeout_ms / 1000.0,
    )
    return app


def _mount(app: FastAPI, state: AppState, router: APIRouter) -> None:
    """Include ``router``; when its guard is enforced, declare the bearer scheme and the 401 in OpenAPI
    (the check itself is the route class's: service/auth.py)."""
    guard = guard_of(router.route_class)
    if guard is None or not state.tokens.enforced(guard):
        app.include_router(router)
    else:
        app.include_router(router, dependencies=[Depends(guard.scheme())], responses=error_responses(401))
