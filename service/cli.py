"""``fair-serve``: run the recommendation service under uvicorn.

Every ``Settings`` field is a flag (``--max-batch-size 64``) and an environment variable
(``FAIR_MAX_BATCH_SIZE=64``); flags win. The flags are exported into the environment before uvicorn
starts, because worker processes build their app from the environment alone. ``FAIR_ADMIN_TOKEN``,
``FAIR_API_TOKENS`` and ``FAIR_BUNDLE_SIGNING_KEY`` are environment-only, so secrets never show up in
``ps``; for the same reason
``--redis-url`` refuses a URL with a password (``FAIR_REDIS_URL`` takes it), and the URL is only ever
printed with its password hidden (``service.redact``).

The HTTP edge (a head deadline, head size and field-count limits, keep-alive idle, a connection cap
per worker) is ``service.edge``'s protocol, selected here.

With no ``FAIR_REDIS_URL`` the embedded Redis is started here, once, and its socket URL handed to
every worker. With ``--workers > 1`` Prometheus multiprocess mode is switched on (a temporary
``PROMETHEUS_MULTIPROC_DIR`` unless one is set) so ``/metrics`` adds up all workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile

from pydantic import ValidationError

from service.redact import flag_refusal, has_secret, redact_url
from service.settings import Settings

# secrets: never on a command line (ps shows it)
ENV_ONLY = {"admin_token", "api_tokens", "bundle_signing_key"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fair-serve",
        description="Serve FAIR recommendations over HTTP (FastAPI + Redis + ONNX Runtime). "
        "Every flag is also the environment variable FAIR_<FLAG> (e.g. --max-wait-ms = FAIR_MAX_WAIT_MS); "
        "the secrets are environment-only: FAIR_ADMIN_TOKEN, FAIR_API_TOKENS (comma-separated), "
        "FAIR_BUNDLE_SIGNING_KEY (comma-separated during a rotation).",
    )
    for name, info in Settings.model_fields.items():
        if name in ENV_ONLY:
            continue
        default = info.get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) else default
        parser.add_argument(
            _flag(name),
            dest=name,
            default=None,
            metavar=name.upper(),
            help=f"{info.description or name} [env FAIR_{name.upper()}; default {shown}]",
        )
    return parser


def _parse(name: str, value: str):
    """CLI string -> a value pydantic accepts as an init argument (lists are comma-separated)."""
    if name == "providers":
        return [p.strip() for p in value.split(",") if p.strip()]
    return value


def _env_value(value) -> str:
    """The form pydantic-settings parses back from the environment (lists as JSON)."""
    return json.dumps(value) if isinstance(value, list) else str(value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if has_secret(args.redis_url):  # the URL is a setting, but its password must not be in ps
        print(flag_refusal("fair-serve", "--redis-url"), file=sys.stderr)
        return 2
    overrides = {k: _parse(k, v) for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        where = f"FAIR_{field.upper()}" if field in ENV_ONLY else f"{_flag(field)} / FAIR_{field.upper()}"
        message = err["msg"].removeprefix("Value error, ")
        print(f"fair-serve: invalid setting {where}: {message}", file=sys.stderr)
        return 2
    if settings.bundle is not None and not settings.bundle.exists():
        print(f"fair-serve: --bundle {settings.bundle}: no such directory", file=sys.stderr)
        return 2
    # Worker processes build their settings from the environment alone: hand the flags down.
    for name, value in overrides.items():
        os.environ[f"FAIR_{name.upper()}"] = _env_value(value)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    import uvicorn  # after the environment is final

    from service import edge
    from service.embedded_redis import EmbeddedRedis
    from service.redis_supervisor import RedisSupervisor

    # uvicorn re-raises the SIGTERM/SIGINT it shut down on, through the handler that was installed
    # before it started. The default handler would kill us here, before the cleanup below (and
    # leave the embedded redis-server running): record the signal instead and exit normally.
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    embedded = supervisor = None
    mp_dir = None
    try:
        if settings.redis_url is None:
            embedded = EmbeddedRedis(settings.data_dir, settings.redis_maxmemory).start()
            if embedded.proc is not None:  # ours (not one left running on this data dir): supervise it
                supervisor = RedisSupervisor(embedded, settings.redis_restart_attempts).start()
            os.environ["FAIR_REDIS_URL"] = embedded.url
            print(
                f"fair-serve: embedded Redis at {redact_url(embedded.url)}, data in {embedded.data_dir}",
                file=sys.stderr,
            )
        else:
            print(f"fair-serve: Redis at {redact_url(settings.redis_url)}", file=sys.stderr)
        if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            mp_dir = tempfile.mkdtemp(prefix="fair-prom-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
        if received:  # asked to stop while the embedded Redis was starting
            return 0
        edge.ensure_fd_limit(settings.max_connections)  # workers inherit it
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level.lower(),
            access_log=False,  # per-request logs cost more than the request; metrics cover it
            timeout_graceful_shutdown=30,
            **edge.uvicorn_options(settings),  # header timeout and limits, keep-alive, connection cap
        )
    except RuntimeError as exc:
        print(f"fair-serve: {exc}", file=sys.stderr)
        return 1
    finally:
        if supervisor is not None:
            supervisor.stop()
        if embedded is not None:
            embedded.stop()
        if mp_dir is not None:
            shutil.rmtree(mp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
