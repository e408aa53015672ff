"""Start the whole container stack for real and check it through HTTP (`make stack-test`).

Builds the images without any image registry (deploy/offline/build-base-images.sh, the
docker-compose.offline.yml override), starts `docker compose up` (or Debian's `docker-compose` v1),
and checks what a user of the stack relies on: the bootstrap finished, the API recommends from the
demo bundle and sees new events, Prometheus scrapes it, the API runs as uid 10001 and is healthy,
and `down` + `up` keeps the Redis data and the bundle without training again. docker-compose.yml has no
default secrets: FAIR_ADMIN_TOKEN and GRAFANA_ADMIN_PASSWORD are taken from the environment, or random
ones are generated for the run (and the admin routes and Grafana's login are checked with them). Prints the wall time
of every phase and a PASS/FAIL line per check; exits 1 when any check failed.

Not part of `make test`: it needs root (or passwordless sudo) to install and start a Docker engine,
several GB of disk, and 10-20 minutes on 2 cores. Runs with the project's .venv (PyPI's PyYAML).
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server as http_server
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
OFFLINE = REPO / "deploy" / "offline"
API_UID = "10001"
DEMO_USERS = 3000  # fair-demo's default --users: what the bootstrap loads into Redis
DEMO_USER = "1"  # the synthetic users are numbered from 1 (the user `make run` prints a curl for)


class StackError(RuntimeError):
    """A step the remaining checks depend on failed; the message says which and why."""


# ---- output: phases with wall times, checks with PASS/FAIL ---------------------------------------------


class Report:
    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []
        self.checks: list[tuple[str, bool, str]] = []
        self.skipped: list[tuple[str, str]] = []

    @contextmanager
    def phase(self, name: str):
        print(f"\n=== {name}", flush=True)
        started = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - started
            self.phases.append((name, took))
            print(f"--- {name}: {took:.1f} s", flush=True)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail else ""), flush=True)
        return ok

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append((name, reason))
        print(f"SKIP  {name}: {reason}", flush=True)

    def summary(self) -> bool:
        print("\n=== summary")
        for name, took in self.phases:
            print(f"phase  {took:8.1f} s  {name}")
        print(f"total  {sum(t for _, t in self.phases):8.1f} s")
        for name, ok, detail in self.checks:
            print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail else ""))
        for name, reason in self.skipped:
            print(f"SKIP  {name}: {reason}")
        failed = sum(not ok for _, ok, _ in self.checks)
        print(f"{len(self.checks) - failed} passed, {failed} failed, {len(self.skipped)} skipped")
        return failed == 0 and bool(self.checks)


# ---- shell helpers --------------------------------------------------------------------------------------


def run(cmd: list[str], *, env: dict | None = None, check: bool = True, capture: bool = False, **kw):
    """Run a command from the repository root; a failure names the command (and its output tail)."""
    shown = " ".join(cmd)
    if not capture:
        print(f"$ {shown}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=capture, check=False, **kw)
    if check and proc.returncode != 0:
        tail = ((proc.stdout or "") + (proc.stderr or ""))[-3000:] if capture else ""
        raise StackError(f"command failed (exit {proc.returncode}): {shown}\n{tail}")
    return proc


def as_root(cmd: list[str]) -> list[str] | None:
    """The command with the privileges it needs, or None when they are not available."""
    if os.geteuid() == 0:
        return cmd
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n", *cmd]
    return None


def apt_install(packages: list[str], allow: bool) -> None:
    if not allow:
        raise StackError(f"missing {', '.join(packages)} and --no-install was given")
    if not shutil.which("apt-get"):
        raise StackError(f"missing {', '.join(packages)} and there is no apt-get to install them")
    apt = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-o", "DPkg::Lock::Timeout=300", "-y", "-q"]
    install = as_root([*apt, "install", "--no-install-recommends", *packages])
    if install is None:
        raise StackError(f"missing {', '.join(packages)}: installing them needs root or passwordless sudo")
    if run(install, check=False).returncode != 0:
        run(as_root([*apt, "update"]))
        run(install)


def docker_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def wait_for(what: str, probe, timeout_s: float, every_s: float = 2.0):
    """Call probe() until it returns something truthy; StackError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except Exception as exc:  # a probe fails in many ways while things start; keep the last reason
            last = None
            reason = exc
        else:
            reason = None
        if last:
            return last
        time.sleep(every_s)
    raise StackError(
        f"timed out after {timeout_s:.0f} s waiting for {what}" + (f": {reason}" if reason else "")
    )


# ---- phase 1: the Docker engine, compose and debootstrap ----------------------------------------------


def ensure_engine(allow_install: bool) -> list[str]:
    """A running Docker engine and a compose command; returns the compose command's argv prefix."""
    needed = []
    if not shutil.which("dockerd") and not docker_answers():
        needed.append("docker.io")
    if not shutil.which("debootstrap"):
        needed.append("debootstrap")
    has_v2 = (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    )
    if not has_v2 and not shutil.which("docker-compose"):
        needed.append("docker-compose")
    if needed:
        apt_install(needed, allow_install)
    if not docker_answers():
        # No systemd in containers and many CI machines: start the daemon by hand, in the background.
        start = as_root(["dockerd"])
        if start is None or not allow_install:
            raise StackError(
                "no Docker engine answers and starting dockerd needs root (or use --no-install off)"
            )
        log = Path("/var/log/fair-stack-dockerd.log") if os.geteuid() == 0 else REPO / ".fair/dockerd.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"starting dockerd in the background (log: {log})", flush=True)
        with open(log, "ab") as out:
            subprocess.Popen(start, stdout=out, stderr=out, start_new_session=True)
        wait_for("dockerd to answer `docker info`", docker_answers, 60, 1)
    server = run(["docker", "version", "--format", "{{.Server.Version}}"], capture=True).stdout.strip()
    compose = ["docker", "compose"] if has_v2 else ["docker-compose"]
    version = run([*compose, "version", "--short"], capture=True, check=False).stdout.strip()
    print(f"Docker engine {server}; compose: {' '.join(compose)} {version}", flush=True)
    return compose


def buildkit_cli_path(path: str) -> str:
    """PATH under which `docker build` (what compose v1 calls) can use BuildKit.

    A docker CLI of version 23+ uses BuildKit only through the buildx plugin; older CLIs, such as the
    20.10 of Debian's docker.io, have it built in. When the first `docker` on PATH is a new CLI
    without buildx, an older one found further down PATH goes first (through a directory holding
    only a link to it), and the rest of PATH is left alone.
    """
    if subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0:
        return path
    for directory in path.split(os.pathsep):
        cli = Path(directory) / "docker"
        if not cli.is_file():
            continue
        version = subprocess.run(
            [str(cli), "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True
        ).stdout.strip()
        major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
        if 0 < major < 23:
            shim = REPO / ".fair" / "stack" / "buildkit-cli"
            shim.mkdir(parents=True, exist_ok=True)
            link = shim / "docker"
            link.unlink(missing_ok=True)
            link.symlink_to(cli)
            print(f"docker CLI for builds: {cli} ({version}, BuildKit built in)", flush=True)
            return os.pathsep.join([str(shim), path])
    raise StackError(
        "no docker CLI that can build with BuildKit: install the buildx plugin (docker-buildx or "
        "docker-buildx-plugin) or Debian's docker.io (its CLI has BuildKit built in)"
    )


# ---- phase 3: the torch CPU wheel, served to the image build over HTTP --------------------------------


TORCH_LOCK = REPO / "deploy" / "requirements" / "torch-cpu.lock.txt"


def torch_cpu_requirement() -> str:
    """`torch==X+cpu` as locked in deploy/requirements/torch-cpu.lock.txt (what the train image takes)."""
    pins = re.findall(r"^torch==(\S+)", TORCH_LOCK.read_text(), re.MULTILINE)
    if len(pins) != 1 or not pins[0].endswith("+cpu"):
        raise StackError(f"{TORCH_LOCK} must lock exactly one torch==X+cpu, found {pins} (make lock)")
    return f"torch=={pins[0]}"


def fill_wheelhouse(wheelhouse: Path, requirement: str) -> Path:
    """A directory holding the torch CPU wheel, fetched with this machine's pip configuration.

    pip takes it from wherever it is configured to (a local find-links directory, an internal
    mirror, download.pytorch.org/whl/cpu) and from the wheelhouse itself, but only a file whose
    sha256 is in the torch lock (--require-hashes): the image build checks the same hashes, so a
    wheel that would fail there fails here, with the reason.
    """
    wheelhouse.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--require-hashes",
        "--only-binary",
        ":all:",
        "--find-links",
        str(wheelhouse),
        "-d",
        str(wheelhouse),
        "-r",
        str(TORCH_LOCK),
    ]
    if run(cmd, check=False).returncode != 0:
        raise StackError(
            f"pip could not get {requirement} with a hash from {TORCH_LOCK.name} (the CPU build of the "
            "pinned torch). Point pip at a place that has it (e.g. "
            "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu, or PIP_FIND_LINKS=DIR) or pass "
            "--wheelhouse DIR holding the wheel."
        )
    wheels = sorted(p.name for p in wheelhouse.glob("*.whl"))
    print(f"wheelhouse {wheelhouse}: {', '.join(wheels)}", flush=True)
    return wheelhouse


def serve_directory(directory: Path) -> tuple[http_server.ThreadingHTTPServer, str]:
    """Serve a directory on 127.0.0.1 (a free port); builds with --network host reach it there."""

    class Quiet(http_server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # pip's requests are not worth a line each
            pass

    server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=directory))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


# ---- talking to the stack -------------------------------------------------------------------------------


def http(
    method: str, url: str, body: dict | None = None, timeout: float = 10.0, headers: dict | None = None
) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """`compose -p PROJECT -f docker-compose.yml -f docker-compose.offline.yml ...` and its containers."""

    def __init__(self, compose: list[str], project: str, env: dict[str, str]):
        self.compose = compose
        self.project = project
        self.env = env
        self.files = ["-f", "docker-compose.yml", "-f", "docker-compose.offline.yml"]

    def __call__(self, *args: str, check: bool = True, capture: bool = False, profiles=()):
        prof = [a for p in profiles for a in ("--profile", p)]
        cmd = [*self.compose, "-p", self.project, *self.files, *prof, *args]
        return run(cmd, env=self.env, check=check, capture=capture)

    def container(self, service: str) -> str:
        """The id of the service's container, running or exited (the same for compose v1 and v2)."""
        out = run(
            [
                "docker",
                "ps",
                "-a",
                "-q",
                "--filter",
                f"label=com.docker.compose.project={self.project}",
                "--filter",
                f"label=com.docker.compose.service={service}",
            ],
            capture=True,
        ).stdout.split()
        if len(out) != 1:
            raise StackError(f"expected one {service} container in project {self.project}, found {len(out)}")
        return out[0]

    def inspect(self, service: str, template: str) -> str:
        return run(
            ["docker", "inspect", "-f", template, self.container(service)], capture=True
        ).stdout.strip()

    def logs(self, service: str) -> str:
        proc = run(["docker", "logs", self.container(service)], capture=True, check=False)
        return proc.stdout + proc.stderr

    def exec(self, service: str, *cmd: str) -> str:
        return run(["docker", "exec", self.container(service), *cmd], capture=True).stdout


def wait_serving(stack: Stack, api: str, report: Report, label: str) -> None:
    """Wait for the bootstrap to finish and the API to be ready; fail with the bootstrap's log."""
    started = time.monotonic()

    def bootstrap_done():
        return stack.inspect("bootstrap", "{{.State.Status}}") == "exited"

    wait_for("the bootstrap container to finish", bootstrap_done, 1800, 5)
    code = stack.inspect("bootstrap", "{{.State.ExitCode}}")
    if not report.check(f"{label}: bootstrap exited 0", code == "0", f"exit {code}"):
        raise StackError("bootstrap failed:\n" + stack.logs("bootstrap")[-4000:])
    print(f"bootstrap finished after {time.monotonic() - started:.0f} s", flush=True)
    wait_for("GET /readyz = 200", lambda: http("GET", f"{api}/readyz", timeout=3)[0] == 200, 300, 2)
    print(f"API ready after {time.monotonic() - started:.0f} s", flush=True)


# ---- the checks -----------------------------------------------------------------------------------------


def recommend(api: str, user: str, k: int) -> dict:
    status, body = http("POST", f"{api}/recommend", {"user_id": user, "k": k})
    if status != 200:
        raise StackError(f"POST /recommend for {user!r}: HTTP {status} {body}")
    return body


def ids(answer: dict) -> list[str]:
    return [item["item_id"] for item in answer["items"]]


def check_api(stack: Stack, api: str, report: Report, k: int) -> dict:
    """The served bundle, recommendations, and new events showing up in them. Returns what later
    checks compare against after the restart."""
    status, model = http("GET", f"{api}/model")
    report.check(
        "GET /model names the demo bundle", status == 200 and model.get("name") == "demo", str(model)[:200]
    )
    version = model.get("version")

    keys = int(
        stack.exec("redis", "redis-cli", "--raw", "eval", "return #redis.call('keys', 'fair:history:*')", "0")
    )
    report.check(
        "bootstrap loaded the demo histories into Redis",
        keys >= DEMO_USERS,
        f"{keys} fair:history:* keys, {DEMO_USERS} demo users",
    )
    demo_user = DEMO_USER
    status, history = http("GET", f"{api}/users/{demo_user}/history")
    if status != 200 or not history["item_ids"]:
        raise StackError(f"demo user {demo_user} has no history in Redis: HTTP {status} {history}")

    first = recommend(api, demo_user, k)
    report.check(
        f"POST /recommend for demo user {demo_user} returns k={k} items from bundle version {version}",
        len(first["items"]) == k and first.get("fallback") is None and first.get("model_version") == version,
        f"{len(first['items'])} items, fallback={first.get('fallback')}, model_version={first.get('model_version')}",
    )

    # A demo user's new event: the item becomes the newest history entry and, being seen, leaves the list.
    clicked = ids(first)[0]
    status, body = http("POST", f"{api}/users/{demo_user}/events", {"item_ids": [clicked]})
    report.check("POST /users/1/events accepted", status == 200, f"HTTP {status} {body}")
    _, history = http("GET", f"{api}/users/{demo_user}/history")
    after = recommend(api, demo_user, k)
    report.check(
        "the demo user's next /recommend reflects the event",
        history["item_ids"][-1] == clicked and clicked not in ids(after) and ids(after) != ids(first),
        f"history ends with {history['item_ids'][-1]}, clicked {clicked}, still recommended: {clicked in ids(after)}",
    )

    # A user Redis has never seen: popular items first, the model's own answer once it has a history.
    new_user = f"stack-test-{int(time.time())}"
    cold = recommend(api, new_user, k)
    events = ids(first)[1:4]
    status, body = http("POST", f"{api}/users/{new_user}/events", {"item_ids": events})
    warm = recommend(api, new_user, k)
    report.check(
        "a new user: popular fallback before any event, model answer without the seen items after",
        status == 200
        and cold.get("fallback") == "popular"
        and warm.get("fallback") is None
        and len(warm["items"]) == k
        and not set(events) & set(ids(warm)),
        f"before: fallback={cold.get('fallback')}; events HTTP {status}; after: fallback={warm.get('fallback')}",
    )
    return {
        "version": version,
        "demo_user": demo_user,
        "clicked": clicked,
        "new_user": new_user,
        "events": events,
    }


def check_admin(api: str, token: str, report: Report) -> None:
    """The admin routes take the token the stack was started with, and nothing else."""
    status, _ = http("GET", f"{api}/admin/model", headers={"Authorization": f"Bearer {token}"})
    without, _ = http("GET", f"{api}/admin/model")
    wrong, _ = http("GET", f"{api}/admin/model", headers={"Authorization": "Bearer " + "x" * 32})
    report.check(
        "GET /admin/model: 200 with FAIR_ADMIN_TOKEN, 401 without it or with another",
        status == 200 and without == 401 and wrong == 401,
        f"with {status}, without {without}, other {wrong}",
    )


def stack_secrets(environ: dict[str, str]) -> dict[str, str]:
    """The secrets docker-compose.yml requires (it has no defaults), the caller's, else random ones;
    and a bundle signing key, so the stack exports signed bundles and the API refuses unsigned ones
    (optional in compose, switched on here: the path a production deployment runs)."""
    return {
        name: environ.get(name) or secrets.token_hex(nbytes)
        for name, nbytes in (
            ("FAIR_ADMIN_TOKEN", 32),
            ("GRAFANA_ADMIN_PASSWORD", 16),
            ("FAIR_BUNDLE_SIGNING_KEY", 32),
        )
    }


def check_container(stack: Stack, report: Report) -> None:
    uid = stack.exec("api", "id", "-u").strip()
    report.check("api container runs as uid 10001", uid == API_UID, f"id -u = {uid}")
    health = wait_for(
        "the api healthcheck to leave 'starting'",
        lambda: (s := stack.inspect("api", "{{.State.Health.Status}}")) != "starting" and s,
        120,
        3,
    )
    report.check("api container healthcheck is healthy", health == "healthy", health)


def check_prometheus(api: str, prom: str, report: Report, k: int) -> None:
    def target_up():
        _, body = http("GET", f"{prom}/api/v1/targets")
        targets = [t for t in body["data"]["activeTargets"] if t["labels"].get("job") == "fair-api"]
        return targets and targets[0]["health"] == "up" and targets[0]

    try:
        target = wait_for("Prometheus to scrape the api target", target_up, 90, 3)
        report.check("Prometheus target fair-api is up", True, target["scrapeUrl"])
    except StackError as exc:
        report.check("Prometheus target fair-api is up", False, str(exc))
        return
    # Traffic across two scrapes, so that rate() over the window has something to differentiate.
    query = 'histogram_quantile(0.99, sum by (le) (rate(fair_request_duration_seconds_bucket{route="/recommend"}[1m])))'

    def latency():
        for user in ("1", "2", "3", "4", "5"):
            recommend(api, user, k)
        _, body = http("GET", f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
        result = body["data"]["result"]
        return result and result[0]["value"][1] not in ("NaN", "+Inf") and result[0]["value"][1]

    try:
        p99 = wait_for("the /recommend p99 query to return a number", latency, 90, 5)
        report.check(
            "Prometheus p99 latency query of /recommend returns data",
            True,
            f"p99 = {float(p99) * 1000:.1f} ms",
        )
    except StackError as exc:
        report.check("Prometheus p99 latency query of /recommend returns data", False, str(exc))


def check_after_restart(stack: Stack, api: str, report: Report, k: int, before: dict, boot_log: str) -> None:
    _, model = http("GET", f"{api}/model")
    report.check(
        "after down/up: the same bundle version is served",
        model.get("version") == before["version"],
        f"version {model.get('version')} (before {before['version']})",
    )
    retrained = "fair-train" in boot_log or "fair-export" in boot_log
    report.check(
        "after down/up: the bootstrap reused the bundle (no training, no export)",
        "reusing it" in boot_log and not retrained,
        next((line for line in boot_log.splitlines() if "reusing it" in line), "no 'reusing it' line"),
    )
    _, new_hist = http("GET", f"{api}/users/{before['new_user']}/history")
    report.check(
        "after down/up: Redis kept the new user's history",
        new_hist.get("item_ids") == before["events"],
        f"{new_hist.get('item_ids')}",
    )
    _, demo_hist = http("GET", f"{api}/users/{before['demo_user']}/history")
    report.check(
        "after down/up: Redis kept the demo user's new event",
        demo_hist.get("item_ids", [None])[-1] == before["clicked"],
        f"newest {demo_hist.get('item_ids', [None])[-1]}, posted {before['clicked']}",
    )
    answer = recommend(api, before["demo_user"], k)
    report.check(
        "after down/up: /recommend serves k items",
        len(answer["items"]) == k and answer.get("fallback") is None,
        f"{len(answer['items'])} items",
    )


def grafana_image() -> str:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["grafana"]["image"]


# ---- main -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="stack_test.py",
        description=__doc__.split("\n\n")[0] + " See docs/operations.md, 'Building without a registry'.",
    )
    p.add_argument(
        "--project", default="fair-stack-test", help="compose project name (default fair-stack-test)"
    )
    p.add_argument("--api-port", type=int, help="host port of the API (default: a free one)")
    p.add_argument("--prometheus-port", type=int, help="host port of Prometheus (default: a free one)")
    p.add_argument("--k", type=int, default=10, help="items per recommendation (default 10)")
    p.add_argument(
        "--wheelhouse",
        type=Path,
        default=REPO / ".fair" / "stack" / "wheelhouse",
        help="directory with the torch CPU wheel; filled with `pip download` (hash-checked against "
        "deploy/requirements/torch-cpu.lock.txt) when it lacks it "
        "(default .fair/stack/wheelhouse)",
    )
    p.add_argument("--no-install", action="store_true", help="never apt-get install or start dockerd")
    p.add_argument("--keep", action="store_true", help="leave the stack running (and its volumes) at the end")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    report = Report()
    api_port = opts.api_port or free_port()
    prom_port = opts.prometheus_port or free_port()
    api, prom = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prom_port}"
    wheel_server = None
    stack = None
    try:
        with report.phase("engine: Docker engine, compose, debootstrap"):
            compose = ensure_engine(not opts.no_install)
        with report.phase("base images from Debian (deploy/offline/build-base-images.sh)"):
            run(as_root([str(OFFLINE / "build-base-images.sh")]) or [str(OFFLINE / "build-base-images.sh")])
        with report.phase("wheelhouse: the torch CPU wheel"):
            requirement = torch_cpu_requirement()
            wheel_server, wheel_url = serve_directory(fill_wheelhouse(opts.wheelhouse, requirement))
        env = dict(os.environ)
        env.update(
            FAIR_WHEELHOUSE_URL=wheel_url,
            FAIR_API_PORT=str(api_port),
            PROMETHEUS_PORT=str(prom_port),
            GRAFANA_PORT=str(free_port()),
            # compose refuses to start without these (no default secrets); random ones for this run
            **stack_secrets(os.environ),
            # BuildKit builds only the stages a target needs. The legacy builder runs every stage before
            # the target: for `runtime` (the last stage) that is the train stage and the GPU stage, whose
            # nvidia/cuda base no registry-less machine has. compose v1 gets BuildKit through the CLI.
            DOCKER_BUILDKIT="1",
            COMPOSE_DOCKER_CLI_BUILD="1",
        )
        env["PATH"] = buildkit_cli_path(env["PATH"])
        stack = Stack(compose, opts.project, env)
        with report.phase("build images (compose build, offline override)"):
            stack("build")
            for tag in ("fair-rec:latest", "fair-rec:train"):
                size = run(["docker", "image", "inspect", "-f", "{{.Size}}", tag], capture=True).stdout
                print(f"image {tag}: {int(size) / 1e6:.0f} MB", flush=True)
        with report.phase("first up: bootstrap builds the bundle, API starts"):
            stack("down", "-v", "--remove-orphans")  # a clean start: no bundle, no histories yet
            stack("up", "-d")
            wait_serving(stack, api, report, "first up")
        with report.phase("checks: API, container, Prometheus"):
            before = check_api(stack, api, report, opts.k)
            check_container(stack, report)
            check_admin(api, env["FAIR_ADMIN_TOKEN"], report)
            check_prometheus(api, prom, report, opts.k)
        with report.phase("down, then up again (volumes kept)"):
            stack("down")
            stack("up", "-d")
            wait_serving(stack, api, report, "second up")
            boot_log = stack.logs("bootstrap")
        with report.phase("checks after the restart"):
            check_after_restart(stack, api, report, opts.k, before, boot_log)
            check_container(stack, report)
        with report.phase("grafana"):
            image = grafana_image()
            if run(["docker", "image", "inspect", image], capture=True, check=False).returncode != 0:
                report.skip(
                    "Grafana",
                    f"no {image} image in the local Docker and no registry to pull it from; Grafana has no "
                    "Debian package (its provisioning is checked by tests/deploy)",
                )
            else:
                stack("up", "-d", "grafana", profiles=["grafana"])
                port = env["GRAFANA_PORT"]
                ok = wait_for(
                    "Grafana /api/health",
                    lambda: http("GET", f"http://127.0.0.1:{port}/api/health")[0] == 200,
                    120,
                    3,
                )
                report.check("Grafana answers /api/health", bool(ok))
                # no anonymous access; the admin password is the one generated above
                base = f"http://127.0.0.1:{port}/api/search"
                anonymous, _ = http("GET", base)
                auth = "Basic " + base64.b64encode(f"admin:{env['GRAFANA_ADMIN_PASSWORD']}".encode()).decode()
                admin, _ = http("GET", base, headers={"Authorization": auth})
                report.check(
                    "Grafana: anonymous /api/search is 401, the admin password works",
                    anonymous == 401 and admin == 200,
                    f"anonymous {anonymous}, admin {admin}",
                )
    except StackError as exc:
        report.check("stack run completed", False, str(exc).splitlines()[0])
        print(f"\nstack_test.py: {exc}", file=sys.stderr, flush=True)
    finally:
        if wheel_server is not None:
            wheel_server.shutdown()
        if stack is not None and not opts.keep:
            with report.phase("down -v (cleanup)"):
                stack("down", "-v", "--remove-orphans", check=False, profiles=["grafana"])
    return 0 if report.summary() else 1


if __name__ == "__main__":
    sys.exit(main())
