"""What GET /model (public) and GET /admin/model (with file paths) say about the bundle being served."""

from __future__ import annotations

from typing import Any

from service.engine import Engine
from service.schemas import ModelResponse, PublicModelResponse, RefusedVersion


def model_summary(
    engine: Engine, manual_pin: int | None, fallback_from: list[RefusedVersion] | None = None
) -> ModelResponse:
    manifest = {k: v for k, v in engine.bundle.manifest.items() if k != "files"}
    return ModelResponse(
        name=engine.name,
        version=engine.version,
        provider=engine.provider,
        path=str(engine.bundle.dir),
        loaded_at=engine.loaded_at,
        manifest=manifest,
        pinned_version=manual_pin,
        fallback_from=fallback_from or [],
    )


def public_model_summary(engine: Engine) -> PublicModelResponse:
    full = model_summary(engine, None)
    return PublicModelResponse(
        **full.model_dump(exclude={"path", "manifest", "pinned_version", "fallback_from"}),
        manifest=without_paths(full.manifest),
    )


def without_paths(value: Any) -> Any:
    """``value`` with every absolute file-system path removed (dict entries dropped, recursively)."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items() if not _is_path(v)}
    if isinstance(value, list):
        return [without_paths(v) for v in value if not _is_path(v)]
    return value


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith("/") or value[1:3] in (":\\", ":/"))
