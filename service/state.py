"""What one worker process holds while it serves, and how the model in it changes: load (at startup,
the newest version that loads), hot reload, the poller that follows new bundle versions, and the
manual pin that pauses it.

Routes read this through the dependencies of service/api/deps.py (``request.app.state.fair``); the
lifespan (service/lifespan.py) fills it in at startup and empties it at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from export.bundle import MANIFEST_FILE, BundleError, list_versions
from service import metrics
from service.auth import TokenChecker
from service.batcher import Batcher
from service.embedded_redis import EmbeddedRedis
from service.engine import Engine, load_engine
from service.errors import ServiceError, unavailable
from service.memory import trim_when_released
from service.redis_store import HistoryStore
from service.redis_supervisor import RedisSupervisor
from service.settings import Settings

log = logging.getLogger("fair.state")


@dataclass(frozen=True)
class Refusal:
    """Why a bundle version was not loaded: ``reason`` one word (``BundleError.reason``, or ``runtime``
    for onnxruntime / warm-up failures; the label of ``fair_bundles_refused_total``), ``message`` the
    error itself."""

    reason: str
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> Refusal:
        reason = exc.reason if isinstance(exc, BundleError) else "runtime"
        return cls(reason, f"{type(exc).__name__}: {exc}")


@dataclass
class AppState:
    settings: Settings
    tokens: TokenChecker
    store: HistoryStore | None = None
    # the embedded server of FAIR_DATA_DIR when that is our Redis (started here, or by fair-serve and
    # handed down as its URL); None with an external Redis
    embedded: EmbeddedRedis | None = None
    supervisor: RedisSupervisor | None = None
    engine: Engine | None = None
    batcher: Batcher | None = None
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    poll_task: asyncio.Task | None = None
    # versions of BUNDLE_ROOT/NAME that failed to load at startup or when the poller tried them, with
    # why (one line, paths included: shown only on /admin/model). The poller does not try them again;
    # in memory only, so a restarted worker tries each once more (and falls back again, never crash-loops)
    refused_versions: dict[int, Refusal] = field(default_factory=dict)
    # a version an operator asked for by number (POST /admin/reload {"version": N}): the poller leaves
    # it alone until a reload without a version releases it, or a manual rollback would be undone by the
    # next poll
    manual_pin: int | None = None
    # after each reload: a task waits for the replaced engine to be collected, then returns its memory to
    # the OS (service/memory.py); kept here (until done) so none is garbage-collected while it waits and
    # shutdown cancels them all
    trim_tasks: set[asyncio.Task] = field(default_factory=set)

    @classmethod
    def from_settings(cls, settings: Settings) -> AppState:
        return cls(settings=settings, tokens=TokenChecker(settings.api_tokens, settings.admin_token))

    @property
    def model_dir(self) -> Path | None:
        """``BUNDLE_ROOT/NAME``: where new versions appear (the parent of a pinned version dir)."""
        b = self.settings.bundle
        if b is None:
            return None
        return b.parent if (b / MANIFEST_FILE).is_file() else b

    @property
    def pinned(self) -> bool:
        """Pinned by configuration: FAIR_BUNDLE names one version directory."""
        b = self.settings.bundle
        return b is not None and (b / MANIFEST_FILE).is_file()

    def fallback_from(self) -> dict[int, Refusal]:
        """Refused versions newer than the one served, newest first: what a fallback skipped (at startup,
        or a newer version the poller could not load). Empty when the newest loadable one is served."""
        if self.engine is None:
            return dict(sorted(self.refused_versions.items(), reverse=True))
        serving = self.engine.version
        return {v: r for v, r in sorted(self.refused_versions.items(), reverse=True) if v > serving}

    def serving(self, reject_reason: str | None = None) -> Engine:
        """The engine new requests use; 503 (counted under ``reject_reason``) before the first load."""
        if self.engine is None:
            raise unavailable("no_model", "no model loaded yet", reject_reason)
        return self.engine


# ---- model loading ----------------------------------------------------------------------------------
def load_and_warm(state: AppState, path: Path, version: int | None) -> Engine:
    s = state.settings
    engine = load_engine(
        path,
        version,
        providers=s.providers,
        intra_op_threads=s.intra_op_threads,
        inter_op_threads=s.inter_op_threads,
        allow_spinning=s.allow_spinning,
        verify=s.verify_bundle,
        signing_keys=s.signing_keys,
    )
    took = engine.warm_up(s.max_batch_size, s.default_beam_size, s.default_k)
    log.info("warmed up %s v%d in %.2fs", engine.name, engine.version, took)
    return engine


def count_refusal(exc: BaseException) -> Refusal:
    refusal = Refusal.of(exc)
    metrics.BUNDLES_REFUSED.labels(reason=refusal.reason).inc()
    return refusal


def load_at_startup(state: AppState) -> Engine:
    """The engine a worker starts with (blocking: run it in a thread).

    FAIR_BUNDLE naming a version directory: that version or an error (a pin means that version).
    Naming ``BUNDLE_ROOT/NAME``: the newest version that loads, trying older ones in turn when it does
    not, each refusal logged, counted and kept in ``refused_versions`` (shown by /healthz and
    /admin/model). One bad version therefore costs a fallback, not a crash loop of every pod that
    restarts or scales up. Only when no version loads does startup fail, naming each one's reason.
    """
    bundle, model_dir = state.settings.bundle, state.model_dir
    assert bundle is not None and model_dir is not None
    versions = [] if state.pinned else list_versions(model_dir)
    if not versions:  # a pinned version, or nothing to choose from: one try, its error as it is
        try:
            return load_and_warm(state, bundle, None)
        except Exception as exc:
            count_refusal(exc)
            raise
    for version in reversed(versions):
        try:
            engine = load_and_warm(state, model_dir, version)
        except Exception as exc:
            refusal = state.refused_versions[version] = count_refusal(exc)
            log.error("startup: bundle version %d refused (%s): %s", version, refusal.reason, refusal.message)
            continue
        skipped = sorted(state.refused_versions, reverse=True)
        if skipped:
            log.warning(
                "startup: serving %s v%d, an older version: newer version(s) %s failed to load (fallback; "
                "see the errors above, GET /admin/model)",
                engine.name, engine.version, ", ".join(map(str, skipped)),
            )  # fmt: skip
        return engine
    raise BundleError(
        f"{model_dir}: no version loads: "
        + "; ".join(f"v{v}: {r.message}" for v, r in sorted(state.refused_versions.items(), reverse=True))
    )


def swap(state: AppState, engine: Engine) -> Engine | None:
    """Atomic for the event loop: new requests see the new engine; queued jobs keep their own."""
    old = state.engine
    previous = (old.name, str(old.version), old.provider) if old is not None else None
    state.engine = engine
    metrics.set_model_info(engine.name, engine.version, engine.provider, previous)
    return old


async def reload_model(state: AppState, version: int | None) -> tuple[Engine, Engine | None]:
    """Load + verify + warm a version off the event loop, then swap; on any failure keep the old one."""
    model_dir = state.model_dir
    if model_dir is None:
        raise ServiceError(409, "reload_failed", "no bundle configured (FAIR_BUNDLE)")
    async with state.reload_lock:
        if version is not None and version not in list_versions(model_dir):
            raise ServiceError(404, "bundle_not_found", f"{model_dir}: no version {version}")
        current = state.engine
        versions = list_versions(model_dir)
        target = version if version is not None else (versions[-1] if versions else None)
        if current is not None and target == current.version and current.bundle.dir.parent == model_dir:
            return current, current
        try:
            engine = await asyncio.to_thread(load_and_warm, state, model_dir, version)
        except Exception as exc:
            refusal = count_refusal(exc)
            log.error(
                "reload of %s (version %s) failed (%s): %s",
                model_dir, version or "newest", refusal.reason, exc,
            )  # fmt: skip
            raise ServiceError(409, "reload_failed", refusal.message) from exc
        state.refused_versions.pop(engine.version, None)  # it loads now (e.g. re-signed)
        old = swap(state, engine)
        log.info("now serving %s v%d (was v%s)", engine.name, engine.version, old.version if old else None)
        if old is not None:
            task = asyncio.create_task(trim_when_released(weakref.ref(old)))
            state.trim_tasks.add(task)
            task.add_done_callback(state.trim_tasks.discard)
        return engine, old


async def manual_reload(state: AppState, version: int | None) -> tuple[Engine, Engine | None]:
    """``POST /admin/reload``: a version by number pins it (polling paused); no version loads the
    newest and releases a pin. The pin changes only when the reload succeeds."""
    engine, old = await reload_model(state, version)
    set_manual_pin(state, version)
    return engine, old


def set_manual_pin(state: AppState, version: int | None) -> None:
    if version != state.manual_pin:
        log.info(
            "manual pin: %s", f"v{version} (polling paused)" if version else "released (polling resumed)"
        )
    state.manual_pin = version
    metrics.set_manual_pin(version)


async def poll_bundles(state: AppState) -> None:
    """Reload when a newer version appears under BUNDLE_ROOT/NAME (unless a version is pinned).

    Any other error (a network mount failing to list the bundle root) is logged and the next poll
    tries again: an exception escaping here would end polling for good and, re-raised at shutdown,
    skip draining the queue and stopping Redis.
    """
    while True:
        await asyncio.sleep(state.settings.bundle_poll_s)
        try:
            await poll_once(state)
        except Exception:
            log.exception("poll: checking %s for new versions failed", state.model_dir)


async def poll_once(state: AppState) -> None:
    model_dir = state.model_dir
    if state.manual_pin is not None or model_dir is None or state.engine is None:
        return
    versions = list_versions(model_dir)
    if not versions:
        return
    newest = versions[-1]
    if newest > state.engine.version and newest not in state.refused_versions:
        try:
            await reload_model(state, newest)
        except ServiceError as exc:
            # don't retry a broken version every poll
            state.refused_versions[newest] = Refusal.of(exc.__cause__ or exc)
            log.error("poll: version %d not loaded: %s", newest, exc.message)
