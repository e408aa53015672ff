"""Every knob of the service in one pydantic-settings object.

One object, one prefix (``FAIR_``): an operator can read the whole configuration surface in one
place, every CLI flag has an environment twin (``--max-batch-size`` == ``FAIR_MAX_BATCH_SIZE``), and
uvicorn worker processes (which only inherit the environment) see exactly what the parent saw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import ByteSize, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from export.signing import check_key

# The latency objective (p99 of POST /recommend) the request histogram must resolve.
LATENCY_OBJECTIVE_S = 0.020
# Hard ceilings of the public API, also used by the request schema (OpenAPI shows them).
MAX_K = 100
MAX_BEAM_SIZE = 200
MAX_REQUEST_HISTORY = 1000
# Redis memory bounds (docs/operations.md, "Security"): idle histories expire, the embedded server has a cap.
HISTORY_TTL_S = 90 * 86400
EMBEDDED_REDIS_MAXMEMORY = 1 << 30  # 1 GiB: ~400k users of 200 ten-character item ids, see the docs


class Settings(BaseSettings):
    """Service configuration; every field is also the environment variable ``FAIR_<FIELD>``."""

    # hide_input_in_errors: a bad FAIR_API_TOKENS / FAIR_ADMIN_TOKEN must not print the secrets
    model_config = SettingsConfigDict(env_prefix="FAIR_", extra="ignore", hide_input_in_errors=True)

    # ---- model ----
    bundle: Path | None = Field(
        None, description="BUNDLE_ROOT/NAME (newest version) or BUNDLE_ROOT/NAME/VERSION (pinned)"
    )
    bundle_poll_s: float = Field(
        0.0, ge=0, description="seconds between checks for a newer version under BUNDLE_ROOT/NAME; 0 = off"
    )
    verify_bundle: bool = Field(True, description="check every sha256 of the bundle before loading")
    bundle_signing_key: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="HMAC-SHA256 key(s) bundles must be signed with (manifest.sig, written by fair-export "
        "from the same variable); comma-separated during a rotation (any one verifies); each at least 32 "
        "characters. Unset: bundles are loaded unauthenticated (the log says so at startup)",
    )

    # ---- HTTP ----
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, description="uvicorn worker processes (metrics add up across them)")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="larger request bodies get 413")
    request_timeout_ms: float = Field(1000.0, gt=0, description="per-request deadline; past it: 504")
    body_timeout_ms: float = Field(
        5000.0, gt=0, description="a request body not fully received within this gets 408 (slow clients)"
    )
    # the HTTP edge (service/edge.py, docs/operations.md "HTTP edge"): what a connection may cost
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a request head (request line + headers) not complete this long after the connection "
        "opened, or after its first byte: 408 (or a plain close when nothing arrived) and the connection closed",
    )
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        description="a larger request head (request line + headers): 431 and the connection closed",
    )
    max_headers: int = Field(
        100, ge=1, description="more header fields than this: 431 and the connection closed"
    )
    keep_alive_s: float = Field(
        5.0,
        gt=0,
        description="an idle keep-alive connection is closed after this; behind a proxy that reuses "
        "connections, set it above the proxy's upstream idle timeout",
    )
    max_connections: int = Field(
        4096,
        ge=1,
        description="open connections per worker process; the next one is answered 503 at accept and closed",
    )
    admin_token: SecretStr | None = Field(None, description="Bearer token of /admin/*; unset = admin off")
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens accepted on /recommend and /users/*; empty = open (the local demo)",
    )
    require_api_tokens: bool = Field(
        False,
        description="refuse to start without an API token: a deployment whose token Secret is empty "
        "fails at start instead of serving an open data plane (the Kubernetes manifests set it)",
    )
    idempotency_ttl_s: int = Field(
        86400, ge=1, description="how long an Idempotency-Key of POST /users/{id}/events is remembered"
    )
    log_level: str = "info"

    # ---- Redis ----
    redis_url: str | None = Field(
        None, description="redis://, rediss://, unix:// URL; unset = embedded Redis under data_dir"
    )
    redis_cluster: bool = Field(False, description="treat redis_url as a seed node of a Redis Cluster")
    redis_timeout_ms: float = Field(200.0, gt=0, description="socket timeout of every Redis call")
    redis_max_connections: int = Field(64, ge=1, description="connection pool size per worker process")
    data_dir: Path = Field(Path("data/service"), description="embedded Redis keeps its files here")
    redis_restart_attempts: int = Field(
        5, ge=1, description="failed restarts of a dead embedded Redis before /healthz answers 503"
    )
    history_key_prefix: str = "fair:history:"
    history_max_items: int = Field(200, ge=1, description="each user's list is trimmed to this length")
    history_ttl_s: int = Field(
        HISTORY_TTL_S,
        ge=0,
        description="a history no event was appended to for this long expires (every append resets the "
        "clock, in the append's own Lua script; reads do not); 0 = never. Default 90 days: a user "
        "idle for a quarter gets the popular fallback, and Redis holds only the users active within it",
    )
    idempotency_key_prefix: str = Field(
        "fair:idem:",
        description="prefix of the Idempotency-Key dedupe records; neither it nor FAIR_HISTORY_KEY_PREFIX "
        "may start with the other, so no user id makes a history key equal a dedupe key",
    )
    redis_maxmemory: ByteSize = Field(
        ByteSize(EMBEDDED_REDIS_MAXMEMORY),
        ge=0,
        description="maxmemory of the embedded Redis (bytes, or '512MiB', '2GB'); 0 = unlimited. Policy "
        "noeviction: when full, writes answer 503 redis_full and no history is dropped silently",
    )

    # ---- recommendation defaults ----
    default_k: int = Field(10, ge=1, le=MAX_K)
    default_beam_size: int = Field(20, ge=1, le=MAX_BEAM_SIZE)

    # ---- inference ----
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_wait_ms: float = Field(
        0.0, ge=0, description="how long the batcher waits to fill a batch (0: take what is queued)"
    )
    queue_size: int = Field(512, ge=1, description="requests waiting for inference; beyond it: 429")
    max_in_flight: int = Field(
        0,
        ge=0,
        description="/recommend requests admitted and not yet answered (per worker); beyond it: 429 at "
        "once. 0 = measured: answers per busy second x request deadline x FAIR_ADMISSION_SHARE",
    )
    admission_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="share of the request deadline the admitted requests may take to drain at the measured "
        "pace (the rest is headroom for the event loop's own work under a burst)",
    )
    intra_op_threads: int = Field(1, ge=0, description="onnxruntime intra-op threads (0 = ORT default)")
    inter_op_threads: int = Field(1, ge=0, description="onnxruntime inter-op threads (0 = ORT default)")
    allow_spinning: bool = Field(False, description="ORT thread spinning; off: it costs 2x on shared cores")
    providers: list[str] = Field(
        default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="onnxruntime providers in preference order (unavailable ones are skipped)",
    )

    @field_validator("api_tokens", "bundle_signing_key", mode="before")
    @classmethod
    def _comma_separated(cls, v):
        """``FAIR_API_TOKENS=a,b`` as well as a JSON list; blank entries are dropped."""
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return [t.strip() for t in v.split(",") if t.strip()]
        return v

    @field_validator("api_tokens")
    @classmethod
    def _tokens_long_enough(cls, v: list[SecretStr]) -> list[SecretStr]:
        for t in v:
            _check_secret(t, "every API token")
        return v

    @field_validator("bundle_signing_key")
    @classmethod
    def _signing_keys_long_enough(cls, v: list[SecretStr]) -> list[SecretStr]:
        for n, key in enumerate(v, start=1):
            check_key(key.get_secret_value(), f"FAIR_BUNDLE_SIGNING_KEY (key {n})")
        return v

    @field_validator("admin_token")
    @classmethod
    def _admin_token_long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        # An empty FAIR_ADMIN_TOKEN is set, not unset: it must not turn the admin routes on with a
        # secret that a request without the header matches.
        if v is not None:
            _check_secret(v, "FAIR_ADMIN_TOKEN (unset it to turn the admin routes off)")
        return v

    @field_validator("history_key_prefix")
    @classmethod
    def _prefix_not_empty(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty")
        return v

    @field_validator("idempotency_key_prefix")
    @classmethod
    def _idem_prefix_plain(cls, v: str) -> str:
        if not v or "{" in v or "}" in v:
            raise ValueError("must not be empty or contain '{' or '}' (the dedupe key's hash tag follows it)")
        return v

    @model_validator(mode="after")
    def _signature_needs_checksums(self) -> Settings:
        # the signature covers the manifest, and the files only through the checksums it lists
        if self.bundle_signing_key and not self.verify_bundle:
            raise ValueError(
                "FAIR_BUNDLE_SIGNING_KEY needs FAIR_VERIFY_BUNDLE=true: the signature covers the bundle's "
                "files only through the checksums"
            )
        return self

    @model_validator(mode="after")
    def _tokens_when_required(self) -> Settings:
        if self.require_api_tokens and not self.api_tokens:
            raise ValueError(
                "FAIR_REQUIRE_API_TOKENS is set but FAIR_API_TOKENS holds no token (unset, blank or only "
                "commas): give it at least one, or the data plane would be open to anyone"
            )
        return self

    @property
    def signing_keys(self) -> list[bytes]:
        """The bundle signing keys as bytes (``export.signing``); [] when none is configured."""
        return [k.get_secret_value().encode() for k in self.bundle_signing_key]

    @model_validator(mode="after")
    def _prefixes_disjoint(self) -> Settings:
        # A history key is FAIR_HISTORY_KEY_PREFIX + any user id: if one prefix started with the other,
        # some user id would make its history key equal another user's dedupe key (WRONGTYPE for both).
        h, i = self.history_key_prefix, self.idempotency_key_prefix
        if h.startswith(i) or i.startswith(h):
            raise ValueError(
                f"FAIR_IDEMPOTENCY_KEY_PREFIX ({i!r}) and FAIR_HISTORY_KEY_PREFIX ({h!r}): neither may "
                "start with the other"
            )
        return self

    def history_key(self, user_id: str) -> str:
        return f"{self.history_key_prefix}{user_id}"


# One rule for every secret of the service: long enough not to be guessed, no blanks around it (a
# copy-paste accident that would otherwise make the token unmatchable or, when empty, match nothing sent).
MIN_SECRET_LENGTH = 16


def _check_secret(secret: SecretStr, what: str) -> None:
    value = secret.get_secret_value()
    if len(value) < MIN_SECRET_LENGTH:
        raise ValueError(f"{what}: needs at least {MIN_SECRET_LENGTH} characters")
    if value != value.strip():
        raise ValueError(f"{what}: has leading or trailing whitespace")
