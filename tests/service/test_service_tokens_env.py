"""``FAIR_API_TOKENS`` as operators set it: from the environment (the secrets are environment-only), a
comma list or a JSON list, every token at least 16 characters, and no token ever echoed: not in a
refusal, not in ``repr(settings)``, not in a 401, the logs, ``/admin/model``, ``/openapi.json`` or
``/metrics``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback

import httpx
import pytest
from pydantic import ValidationError
from service_testlib import ADMIN_TOKEN, LiveServer

from service.settings import MIN_SECRET_LENGTH, Settings

TOKEN_A = "env-token-alpha-0123456789"
TOKEN_B = "env-token-bravo-9876543210"
SHORT = "short-tok"  # under MIN_SECRET_LENGTH


@pytest.fixture
def clean_env(monkeypatch):
    """No FAIR_* of the outer environment (a developer's shell, CI) leaks into these settings."""
    for name in list(os.environ):
        if name.startswith("FAIR_"):
            monkeypatch.delenv(name)
    return monkeypatch


def _tokens(settings: Settings) -> list[str]:
    return [t.get_secret_value() for t in settings.api_tokens]


@pytest.mark.parametrize(
    "value, expected",
    [
        (f"{TOKEN_A},{TOKEN_B}", [TOKEN_A, TOKEN_B]),
        (f" {TOKEN_A} , ,{TOKEN_B},\n", [TOKEN_A, TOKEN_B]),  # blanks around entries, empty entries
        (TOKEN_A, [TOKEN_A]),
        (f'["{TOKEN_A}", "{TOKEN_B},with-a-comma"]', [TOKEN_A, f"{TOKEN_B},with-a-comma"]),  # JSON list
        (" ", []),  # set but blank: no tokens (the open data plane of the loopback-only stack)
    ],
)
def test_fair_api_tokens_is_read_from_the_environment(clean_env, value, expected):
    clean_env.setenv("FAIR_API_TOKENS", value)
    assert _tokens(Settings()) == expected


@pytest.mark.parametrize(
    "value, why",
    [
        (f"{TOKEN_A},{SHORT}", f"at least {MIN_SECRET_LENGTH} characters"),
        (f"{SHORT},{TOKEN_A}", f"at least {MIN_SECRET_LENGTH} characters"),
        (f'["{TOKEN_A}", " {TOKEN_B} "]', "leading or trailing whitespace"),  # JSON keeps the blanks
        (f'["{TOKEN_A}", "{TOKEN_B}"', "api_tokens"),  # malformed JSON
    ],
)
def test_a_bad_token_list_is_refused_without_echoing_any_token(clean_env, value, why):
    clean_env.setenv("FAIR_API_TOKENS", value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    # what a crashing worker prints (its traceback) and the message fair-serve builds from
    text = "".join(traceback.format_exception(refused.value))
    text += " ".join(e["msg"] for e in refused.value.errors())
    assert why in text
    for secret in (TOKEN_A, TOKEN_B, SHORT):
        assert secret not in text


def test_settings_never_show_the_tokens(clean_env):
    clean_env.setenv("FAIR_API_TOKENS", f"{TOKEN_A},{TOKEN_B}")
    clean_env.setenv("FAIR_ADMIN_TOKEN", ADMIN_TOKEN + "-0123456789")
    settings = Settings()
    assert len(settings.api_tokens) == 2 and settings.admin_token is not None
    shown = [repr(settings), str(settings), settings.model_dump_json(), repr(settings.model_dump())]
    for text in shown:
        for secret in (TOKEN_A, TOKEN_B, ADMIN_TOKEN):
            assert secret not in text


def test_fair_serve_refuses_a_short_token_from_the_environment_and_names_no_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAIR_")}
    env.update(FAIR_API_TOKENS=f"{TOKEN_A},{SHORT}", FAIR_DATA_DIR=str(tmp_path))
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "invalid setting FAIR_API_TOKENS" in r.stderr and "at least 16 characters" in r.stderr
    assert "--api-tokens" not in r.stderr  # environment-only: no flag exists to name
    assert TOKEN_A not in r.stderr + r.stdout and SHORT not in r.stderr + r.stdout
    assert not list(tmp_path.iterdir())  # refused before anything started (no embedded Redis)


@pytest.fixture
def captured_logs(caplog):
    """Every log record of the service, uvicorn's included (its loggers do not propagate to the root)."""
    caplog.set_level(logging.DEBUG)
    extra = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    for lg in extra:
        lg.addHandler(caplog.handler)
    yield caplog
    for lg in extra:
        lg.removeHandler(caplog.handler)


def test_an_app_configured_from_the_environment_accepts_each_token_and_echoes_none(
    clean_env, captured_logs, tiny_bundle, redis_settings
):
    env = {
        "FAIR_API_TOKENS": f"{TOKEN_A}, {TOKEN_B}",
        "FAIR_ADMIN_TOKEN": ADMIN_TOKEN,
        "FAIR_BUNDLE": str(tiny_bundle.model_dir),
        "FAIR_PROVIDERS": '["CPUExecutionProvider"]',
        "FAIR_REQUEST_TIMEOUT_MS": "30000",
        "FAIR_REDIS_TIMEOUT_MS": "5000",
        "FAIR_LOG_LEVEL": "debug",
    }
    env.update({f"FAIR_{k.upper()}": str(v) for k, v in redis_settings.items()})
    for name, value in env.items():
        clean_env.setenv(name, value)
    ids = tiny_bundle.dataset.item_ids
    seen: list[str] = []  # every body and header the service sent back
    with LiveServer(Settings()) as live:
        for i, token in enumerate((TOKEN_A, TOKEN_B)):
            auth = {"Authorization": f"Bearer {token}"}
            r = httpx.post(f"{live.url}/users/env{i}/events", json={"item_ids": ids[:2]}, headers=auth)
            assert r.status_code == 200, r.text
            r = httpx.post(f"{live.url}/recommend", json={"user_id": f"env{i}", "k": 3}, headers=auth)
            assert r.status_code == 200 and r.json()["fallback"] is None, r.text
            seen += [r.text, str(r.headers)]
        # a wrong token, a token of the other guard, and a near miss: refused, and never echoed back
        for sent in ("wrong-token-0123456789", ADMIN_TOKEN, TOKEN_A[:-1]):
            r = httpx.get(f"{live.url}/users/env0/history", headers={"Authorization": f"Bearer {sent}"})
            assert r.status_code == 401, r.text
            assert sent not in r.text and sent not in str(r.headers)
            seen += [r.text, str(r.headers)]
        admin = httpx.get(f"{live.url}/admin/model", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert admin.status_code == 200, admin.text
        seen += [
            admin.text,
            httpx.get(f"{live.url}/openapi.json").text,
            httpx.get(f"{live.url}/metrics").text,
        ]
        seen.append(httpx.get(f"{live.url}/model").text)
    logged = "\n".join(r.getMessage() for r in captured_logs.records)
    assert captured_logs.records  # the capture works (startup, the bundle's load, ...)
    for text in [*seen, logged]:
        assert TOKEN_A not in text and TOKEN_B not in text


@pytest.mark.parametrize("value", ["", " ", ",, ,"])
def test_required_tokens_refuse_an_empty_list(clean_env, value):
    """FAIR_REQUIRE_API_TOKENS (set by the Kubernetes manifests): a blank token Secret stops the worker
    instead of serving an open data plane; with a token it starts as usual."""
    clean_env.setenv("FAIR_REQUIRE_API_TOKENS", "true")
    clean_env.setenv("FAIR_API_TOKENS", value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert "holds no token" in str(refused.value)
    clean_env.setenv("FAIR_API_TOKENS", TOKEN_A)
    assert _tokens(Settings()) == [TOKEN_A]
