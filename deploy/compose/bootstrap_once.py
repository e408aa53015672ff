"""Entry point of the compose `bootstrap` service: load the demo histories into Redis once, not on every `up`.

usage: FAIR_REDIS_URL=URL python bootstrap_once.py fair-demo load --dir DIR --bundles ROOT [fair-demo options]

`fair-demo load` builds (or reuses) the demo bundle and then replaces every demo user's history list
in Redis. Run on every `docker compose up`, that replacement would throw away the events the API
stored since the last start (the histories live on the redis-data volume, which `down` keeps). So:

- Redis has no marker key yet (a fresh volume): run the command as given, then set the marker;
- the marker is there: run `fair-demo build` with the same options instead, which makes sure the
  bundle exists (reused when it does) and leaves Redis alone.

The Redis URL comes from FAIR_REDIS_URL (a `--redis URL` in the command, which fair-demo accepts
only without a password, takes precedence); it is never printed.

The marker lives in the same Redis as the histories, so losing the volume loses both and the next
start loads again. Delete the key (`redis-cli del fair:demo:loaded`) to force a reload.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

MARKER = "fair:demo:loaded"
USAGE = __doc__.split("\n\n")[1]


def split_command(argv: list[str], env: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """(Redis URL, the `fair-demo build` command with the same options) of a `fair-demo load` command.

    The URL is the command's `--redis URL` if it has one, else FAIR_REDIS_URL of ``env`` (default:
    this process's environment)."""
    env = os.environ if env is None else env
    if argv[:2] != ["fair-demo", "load"]:
        raise ValueError(f"expected `fair-demo load ...`, got {argv[:2]}")
    build = ["fair-demo", "build", *argv[2:]]
    url = env.get("FAIR_REDIS_URL", "")
    if "--redis" in argv:
        at = argv.index("--redis")
        if at + 1 >= len(argv):
            raise ValueError("--redis needs a URL")
        url = argv[at + 1]
        build = ["fair-demo", "build", *argv[2:at], *argv[at + 2 :]]
    if not url:
        raise ValueError("no Redis URL: set FAIR_REDIS_URL (the compose file does)")
    return url, build


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 2)[2])
        return 0 if argv else 2
    import redis  # the training image has it (the serving core's dependency); imported late for --help

    try:
        url, build = split_command(argv)
    except ValueError as exc:
        print(f"bootstrap_once: {exc}", file=sys.stderr)
        return 2
    client = redis.Redis.from_url(url, socket_timeout=10)
    loaded = client.get(MARKER)
    if loaded is not None:
        print(
            f"bootstrap_once: Redis already holds the demo histories ({loaded.decode()}); not reloading them, "
            "since that would overwrite events stored since. Making sure the bundle exists.",
            flush=True,
        )
        return subprocess.call(build)
    rc = subprocess.call(argv)
    if rc == 0:
        client.set(MARKER, json.dumps({"loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
