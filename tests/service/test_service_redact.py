"""Redis URLs are shown with their passwords hidden, and no CLI takes a password on its command line
(issue 24.5): service/redact.py, and fair-serve's --redis-url and startup log."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from password_redis import PasswordRedis

from service import cli
from service.redact import has_secret, redact_url


@pytest.mark.parametrize(
    "url,shown",
    [
        ("redis://:pw-123@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://app:pw-123@redis:6379/0", "redis://app:***@redis:6379/0"),
        (
            "rediss://default:p%40ss@h.example:6380/1?ssl_cert_reqs=required",
            "rediss://default:***@h.example:6380/1?ssl_cert_reqs=required",
        ),
        ("redis://tokenonly@redis:6379", "redis://***@redis:6379"),  # a lone user-info may be a password
        ("redis://app:pa@ss:word@redis/0", "redis://app:***@redis/0"),  # an unencoded @: hidden all the same
        ("redis://:pa/ss@redis/0", "redis://:***@redis/0"),  # an unencoded / too
        ("redis://redis/0?password=pw-123&db=2", "redis://redis/0?password=***&db=2"),
        ("rediss://redis/0?ssl_password=pw-123", "rediss://redis/0?ssl_password=***"),
        ("unix://:pw-123@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("unix:///tmp/fair-redis/redis.sock", "unix:///tmp/fair-redis/redis.sock"),
        ("not a url: user:pw-123@host", "not a url:***@host"),
        (None, "(none)"),
    ],
)
def test_redact_url_hides_every_password(url, shown):
    assert redact_url(url) == shown
    assert "pw-123" not in redact_url(url)
    assert has_secret(url) is (url is not None and shown != url)


def test_fair_serve_refuses_a_password_on_its_command_line(capsys):
    assert cli.main(["--redis-url", "redis://:hunter2hunter2@redis:6379/0"]) == 2
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err
    assert "FAIR_REDIS_URL" in captured.err and "--redis-url" in captured.err


def test_fair_serve_logs_the_redis_url_without_its_password(tmp_path):
    """A real fair-serve on a real password-protected Redis, started with a WRONG password: its startup
    line and the Redis outage it logs name the server, never a password."""
    server = PasswordRedis(tmp_path / "redis").start()
    wrong = "wrong-" + server.password[::-1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAIR_")}
    env.update(FAIR_REDIS_URL=server.url(password=wrong), FAIR_DATA_DIR=str(tmp_path / "data"))
    code = "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [
        sys.executable,
        "-c",
        code,
        "--port",
        str(port),
        "--log-level",
        "info",
        "--redis-timeout-ms",
        "500",
    ]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert ready is not None and ready.status_code == 503  # Redis refuses the password
        assert server.password not in ready.text and wrong not in ready.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        server.stop()
    assert wrong not in output and server.password not in output
    assert f"fair-serve: Redis at redis://:***@127.0.0.1:{server.port}/0" in output
    assert "redis unavailable" in output  # the outage was logged, without the URL's secret
