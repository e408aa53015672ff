"""fair-load-histories: every user's list written newest last, trimmed, and a rerun changes nothing; a
Redis URL with a password is taken from FAIR_REDIS_URL only and never printed (issue 24.5)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import pytest
from password_redis import PasswordRedis

from service.embedded_redis import EmbeddedRedis
from service.load_histories import main
from service.redis_store import sync_client

SPEC = "synthetic:items=80,users=30,seed=3"


def _snapshot(client, prefix: str) -> dict[str, list[str]]:
    return {key: client.lrange(key, 0, -1) for key in client.scan_iter(match=f"{prefix}*")}


def test_load_is_complete_trimmed_and_idempotent(redis_settings):
    from model.data.loading import load_dataset

    dataset = load_dataset(SPEC)
    url = redis_settings.get("redis_url")
    prefix = redis_settings.get("history_key_prefix", "fair:history:") + "lh:"
    with tempfile.TemporaryDirectory(prefix="fair-lh-") as data_dir:
        server = None if url else EmbeddedRedis(data_dir).start()
        try:
            url = url or server.url
            cluster = redis_settings.get("redis_cluster", False)
            client = sync_client(url, cluster=cluster)
            args = ["--data", SPEC, "--redis", url, "--prefix", prefix, "--max-items", "6", "--chunk", "7"]
            args += ["--cluster"] if cluster else []
            assert main(args) == 0
            first = _snapshot(client, prefix)
            assert len(first) == dataset.num_users
            for user, seq in zip(dataset.user_ids, dataset.sequences, strict=True):
                assert first[prefix + user] == [dataset.item_ids[i] for i in seq[-6:]]
            client.rpush(prefix + dataset.user_ids[0], "live-event")  # drift, undone by a rerun
            assert main(args) == 0
            assert _snapshot(client, prefix) == first
            client.delete(*first)
        finally:
            if server is not None:
                server.stop()


def test_bad_data_is_a_one_line_error(capsys):
    assert (
        main(["--data", os.path.join(tempfile.gettempdir(), "no-such-dataset-dir"), "--redis", "redis://x"])
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("fair-load-histories: --data") and "\n" not in err


# ---- the Redis URL's password (issue 24.5): env-only, never printed ----------------------------------------


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory):
    server = PasswordRedis(tmp_path_factory.mktemp("password-redis")).start()
    yield server
    server.stop()


def _cli(args: list[str], url: str | None) -> subprocess.CompletedProcess:
    """fair-load-histories as a user runs it: its own process, the URL (if any) in FAIR_REDIS_URL."""
    env = {k: v for k, v in os.environ.items() if k != "FAIR_REDIS_URL"}
    if url is not None:
        env["FAIR_REDIS_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "service.load_histories", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("user", ["", "default"])
def test_a_url_with_a_password_from_the_environment_loads_and_is_never_printed(password_redis, user):
    url = password_redis.url(user=user)
    prefix = f"fair:lh-secret:{user or 'nouser'}:"
    proc = _cli(["--data", SPEC, "--prefix", prefix], url)
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert password_redis.password not in output
    assert f"into redis://{user}:***@127.0.0.1:{password_redis.port}/0" in proc.stdout
    client = password_redis.client()
    keys = list(client.scan_iter(match=f"{prefix}*"))
    assert len(keys) == 30  # the spec's users
    client.delete(*keys)


def test_a_wrong_password_is_a_one_line_error_without_the_password(password_redis):
    wrong = "wrong" + password_redis.password[::-1]
    proc = _cli(["--data", SPEC], password_redis.url(password=wrong))
    assert proc.returncode == 1
    assert wrong not in proc.stdout + proc.stderr and password_redis.password not in proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith(f"fair-load-histories: redis redis://:***@127.0.0.1:{password_redis.port}/0: ")


def test_an_unreachable_redis_with_a_password_is_reported_without_it():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "s3cr3t-" + "x" * 20
    proc = _cli(["--data", SPEC], f"redis://fair:{secret}@127.0.0.1:{port}/0")
    assert proc.returncode == 1
    assert secret not in proc.stdout + proc.stderr
    assert f"redis://fair:***@127.0.0.1:{port}/0" in proc.stderr


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2hunter2@redis:6379/0",
        "rediss://app:hunter2hunter2@redis:6380/0",
        "redis://redis/0?password=hunter2hunter2",
    ],
)
def test_the_flag_refuses_a_url_with_a_password(url, capsys):
    assert main(["--data", SPEC, "--redis", url]) == 2
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err
    assert "FAIR_REDIS_URL" in captured.err and "--redis" in captured.err
