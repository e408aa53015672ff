"""Idempotent writes: an event is stored once, whether the Redis client or the caller sends it twice.

Each test freezes a Redis server it owns (SIGSTOP), as a stalled or overloaded Redis does, so the first
copy of the write reaches Redis but its answer comes too late. The server is thawed when a condition
says the scenario has happened (the client library's retry is waiting on the frozen server, the caller
got its 503), never after a fixed time: on a loaded 2-core machine a timer raced the timeouts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import quote

import httpx
import pytest
import redis
from pydantic import ValidationError
from redis.crc import key_slot
from service_testlib import LiveServer, make_settings

from service.embedded_redis import EmbeddedRedis
from service.redis_store import dedupe_key
from service.settings import Settings

WAIT_S = 60.0  # the most any condition below is waited for (a loaded machine, not a timing margin)


@contextmanager
def own_redis_server(tiny_bundle, **overrides):
    with tempfile.TemporaryDirectory(prefix="fair-idem-") as data_dir:
        redis_server = EmbeddedRedis(data_dir).start()
        try:
            settings = make_settings(tiny_bundle, {"redis_url": redis_server.url}, **overrides)
            with LiveServer(settings) as live:
                yield live, redis_server
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)  # never leave a frozen server behind
            redis_server.stop()


@contextmanager
def frozen(redis_server: EmbeddedRedis) -> Iterator[None]:
    """The server stopped (SIGSTOP) for the block: connections still queue in the kernel, nothing is
    read or answered; thawed (SIGCONT) on leaving the block, whatever happened in it."""
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.01)


def pending_connections(socket_path) -> int:
    """Connections waiting in the listen queue of a Unix socket (``ss``'s Recv-Q of a listening socket):
    on a frozen server, each is a client that connected since the freeze."""
    ss = shutil.which("ss")
    if ss is None:
        pytest.fail("`ss` (iproute2) is not on PATH: this test reads a socket's listen queue with it")
    out = subprocess.run([ss, "-xlnH"], capture_output=True, text=True, check=True, timeout=30).stdout
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[4] == str(socket_path):
            return int(fields[2])
    raise AssertionError(f"no listening socket {socket_path} in `ss -xl`:\n{out}")


def store_client(redis_server: EmbeddedRedis) -> redis.Redis:
    """Our own view of the server, with a timeout for a loaded machine."""
    return redis.Redis(
        unix_socket_path=str(redis_server.socket_path), socket_timeout=10, decode_responses=True
    )


def test_a_write_retried_by_the_redis_client_is_stored_once(tiny_bundle):
    """The issue's repro: a stall longer than the Redis timeout stored the item twice and answered 200
    (the client library re-sent the MULTI/RPUSH/EXEC after the first copy landed). The server stays
    frozen until the library's retry has connected to it, i.e. the first copy was sent and timed out;
    thawed then, the server runs both copies and the retry gets its answer well inside its timeout."""
    with own_redis_server(tiny_bundle, redis_timeout_ms=2_000) as (live, redis_server):
        warm = httpx.get(f"{live.url}/users/d1/history")  # a pooled connection, as in traffic
        assert warm.status_code == 200
        answer: list[httpx.Response] = []
        with frozen(redis_server):
            assert pending_connections(redis_server.socket_path) == 0
            write = threading.Thread(
                target=lambda: answer.append(
                    httpx.post(f"{live.url}/users/d1/events", json={"item_ids": ["item0"]}, timeout=60)
                )
            )
            write.start()
            wait_until(
                lambda: pending_connections(redis_server.socket_path) >= 1,
                "the Redis client's retry connecting to the frozen server",
            )
            assert not answer  # still waiting for the retry's answer
        write.join(WAIT_S)
        (r,) = answer
        assert r.status_code == 200, r.text  # the client's retry found the recorded answer
        assert "idempotent-replayed" not in r.headers  # the caller sent no key: nothing to tell it
        assert httpx.get(f"{live.url}/users/d1/history").json()["item_ids"] == ["item0"]


def test_a_client_retry_with_an_idempotency_key_is_applied_once(tiny_bundle):
    with own_redis_server(tiny_bundle, redis_timeout_ms=1_000) as (live, redis_server):
        url, key = f"{live.url}/users/d2/events", {"Idempotency-Key": "evt-7f3a"}
        assert httpx.post(url, json={"item_ids": ["item1"]}).json()["history_length"] == 1
        with frozen(redis_server):  # until the caller has its answer: both attempts time out
            first = httpx.post(url, json={"item_ids": ["item2", "item3"]}, headers=key, timeout=60)
        assert first.status_code == 503, first.text  # timed out: the caller cannot know it was stored
        # thawed, the server runs the copy it had received (that is the point: it was stored)
        probe = store_client(redis_server)
        history_key = live.settings.history_key("d2")
        wait_until(lambda: probe.llen(history_key) == 3, "the write sent before the 503 landing")
        retry = httpx.post(url, json={"item_ids": ["item2", "item3"]}, headers=key, timeout=10)
        assert retry.status_code == 200, retry.text
        assert retry.json()["history_length"] == 3
        assert retry.headers["idempotent-replayed"] == "true"
        assert httpx.get(f"{live.url}/users/d2/history").json()["item_ids"] == ["item1", "item2", "item3"]

        again = httpx.post(url, json={"item_ids": ["item2", "item3"]}, headers=key)
        assert again.json()["history_length"] == 3  # the first answer, not the current length + 2
        conflict = httpx.post(url, json={"item_ids": ["item9"]}, headers=key)
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict"
        # the key is scoped to the user: another user's write with it is a different write
        other = httpx.post(f"{live.url}/users/d3/events", json={"item_ids": ["item9"]}, headers=key)
        assert other.status_code == 200 and "idempotent-replayed" not in other.headers
        assert httpx.get(f"{live.url}/users/d2/history").json()["item_ids"] == ["item1", "item2", "item3"]
        assert probe.llen(history_key) == 3
        probe.close()


def test_the_dedupe_key_expires_after_the_configured_ttl(tiny_bundle):
    with own_redis_server(tiny_bundle, idempotency_ttl_s=1) as (live, redis_server):
        probe = store_client(redis_server)
        # A replay is a replay only while the record lives (1 s). Whether it did is measured, not
        # assumed: the record's time left before the replay exceeds the replay's whole round trip.
        # A machine that stalls longer than that gets another try with a fresh user.
        for attempt in range(20):
            user, key = f"d4-{attempt}", {"Idempotency-Key": "k1"}
            url = f"{live.url}/users/{user}/events"
            assert httpx.post(url, json={"item_ids": ["item1"]}, headers=key).json()["history_length"] == 1
            idem = dedupe_key(live.settings.history_key(user), "k1", live.settings.idempotency_key_prefix)
            started = time.monotonic()
            left_ms = probe.pttl(idem)
            assert left_ms <= 1000  # the configured TTL (-2 once expired)
            replay = httpx.post(url, json={"item_ids": ["item1"]}, headers=key)
            if (time.monotonic() - started) * 1000 < left_ms:
                assert replay.json()["history_length"] == 1
                assert replay.headers["idempotent-replayed"] == "true"
                break
        else:
            pytest.fail("20 tries: the machine never answered a replay within the 1 s TTL")
        # past the TTL the key is forgotten: the same key is a new write
        wait_until(lambda: not probe.exists(idem), "the dedupe record expiring")
        again = httpx.post(url, json={"item_ids": ["item1"]}, headers=key)
        assert again.json()["history_length"] == 2 and "idempotent-replayed" not in again.headers
        probe.close()


@pytest.mark.parametrize("bad", ["", "with space", "x" * 129, "é"])
def test_invalid_idempotency_keys_are_refused(server, bad):
    r = httpx.post(
        f"{server.url}/users/d5/events",
        json={"item_ids": ["item0"]},
        headers={"Idempotency-Key": bad.encode()},
    )
    assert r.status_code == 422 and r.json()["error"]["field"] == "header.Idempotency-Key", r.text


def test_dedupe_keys_share_the_history_keys_cluster_slot():
    for history_key in ["fair:history:alice", "fair:history:{tagged}x", "fair:history:a{b"]:
        idem = dedupe_key(history_key, "token")
        assert key_slot(idem.encode()) == key_slot(history_key.encode()), history_key
    # two users whose history keys share a hash tag share the slot, never the dedupe key
    assert dedupe_key("fair:history:{t}a", "token") != dedupe_key("fair:history:{t}b", "token")
    assert key_slot(dedupe_key("fair:history:{t}a", "token").encode()) == key_slot(b"fair:history:{t}b")


def _old_dedupe_key(history_key: str, token: str) -> str:
    """Where the dedupe record of ``token`` lived before its own prefix: the history key + ``:idem:SHA``
    (a history key with a hash tag kept it as it was)."""
    return f"{history_key}:idem:{hashlib.sha256(token.encode()).hexdigest()[:32]}"


@pytest.mark.parametrize("crafted_first", [True, False])
def test_a_crafted_user_id_cannot_block_another_users_writes(server, crafted_first):
    """Issue 24: the dedupe key of user ``{x}`` was the history key of user ``{x}:idem:SHA``. Whichever
    wrote first, the other's next write met a key of the wrong type (WRONGTYPE: 503) for a whole day."""
    victim, token = "{" + uuid.uuid4().hex[:8] + "}", "evt-0001"
    crafted = _old_dedupe_key(victim, token)  # a user id whose history key was the victim's dedupe key
    assert server.settings.history_key(crafted) == _old_dedupe_key(server.settings.history_key(victim), token)
    writes = [
        (f"/users/{quote(crafted, safe='')}/events", {"item_ids": ["item5"]}, {}),
        (f"/users/{quote(victim, safe='')}/events", {"item_ids": ["item6"]}, {"Idempotency-Key": token}),
    ]
    for path, body, headers in writes if crafted_first else writes[::-1]:
        r = httpx.post(server.url + path, json=body, headers=headers)
        assert r.status_code == 200 and r.json()["history_length"] == 1, r.text
    replay = httpx.post(server.url + writes[1][0], json=writes[1][1], headers=writes[1][2])
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true", replay.text
    assert httpx.get(f"{server.url}/users/{quote(victim, safe='')}/history").json()["item_ids"] == ["item6"]
    assert httpx.get(f"{server.url}/users/{quote(crafted, safe='')}/history").json()["item_ids"] == ["item5"]


def test_dedupe_keys_live_under_their_own_prefix():
    key = dedupe_key("fair:history:alice", "t", "fair:idem:")
    assert key.startswith("fair:idem:{fair:history:alice}:") and not key.startswith("fair:history:")
    for history, idem in [("fair:history:", "fair:history:idem:"), ("fair:", "fair:idem:"), ("a", "a")]:
        with pytest.raises(ValidationError, match="neither may start with the other"):
            Settings(history_key_prefix=history, idempotency_key_prefix=idem)
    for bad in ("", "fair:{idem}:", "fair:idem}"):
        with pytest.raises(ValidationError):
            Settings(idempotency_key_prefix=bad)
