"""The registry-free build path (deploy/offline/, docker-compose.offline.yml), checked as files.

`make stack-test` builds and starts the stack for real; it needs Docker and root, so it is not part of
`make test`. These checks catch, without Docker, the mistakes that would only show there: an override
pointing at a tag the base-image script does not build, a torch pin that drifted from pyproject.toml,
compose syntax that Debian's docker-compose v1 rejects, a BuildKit frontend that must be pulled.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest
import yaml
from deploy_support import DEPLOY, REPO

OFFLINE = DEPLOY / "offline"
SCRIPT = OFFLINE / "build-base-images.sh"


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def script_tags() -> set[str]:
    """Image tags build-base-images.sh creates, with its default suite substituted."""
    text = SCRIPT.read_text()
    suite = re.search(r"^SUITE=(\S+)$", text, re.MULTILINE).group(1)
    tags = set(re.findall(r'^build "([^"]+)" \S+\.Dockerfile$', text, re.MULTILINE))
    tags.add(re.search(r"^DEBIAN_IMAGE=(\S+)$", text, re.MULTILINE).group(1))
    return {t.replace("$SUITE", suite) for t in tags}


def test_override_uses_only_images_the_script_builds():
    override = load("docker-compose.offline.yml")["services"]
    tags = script_tags()
    assert {"fair-offline/redis:bookworm", "fair-offline/prometheus:bookworm"} <= tags
    for name in ("redis", "prometheus"):
        assert override[name]["image"] in tags, name
    for name in ("api", "bootstrap"):
        build = override[name]["build"]
        assert build["args"]["PYTHON_IMAGE"] in tags, name
        # pip and apt inside the build reach the host's mirrors and the wheelhouse served on loopback
        assert build["network"] == "host", name


def test_override_only_touches_services_of_the_stack():
    assert set(load("docker-compose.offline.yml")["services"]) <= set(load("docker-compose.yml")["services"])


def test_every_base_image_has_its_dockerfile():
    for file in re.findall(r'^build "[^"]+" (\S+\.Dockerfile)$', SCRIPT.read_text(), re.MULTILINE):
        text = (OFFLINE / file).read_text()
        assert re.search(r"^FROM \$\{DEBIAN_IMAGE\}$", text, re.MULTILINE), file


def test_train_build_takes_only_the_cpu_build_of_the_pinned_torch():
    train_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "train"
    ]
    (pin,) = [r for r in train_extra if r.startswith("torch==")]
    # the torch lock the train image installs with --require-hashes: the CPU build of the pin
    lock = (DEPLOY / "requirements" / "torch-cpu.lock.txt").read_text()
    assert re.findall(r"^torch==(\S+)", lock, re.MULTILINE) == [pin.split("==")[1] + "+cpu"]
    args = load("docker-compose.offline.yml")["services"]["bootstrap"]["build"]["args"]
    assert args["TORCH_INDEX_URL"] == ""  # no download.pytorch.org on a machine without it
    assert args["WHEELHOUSE_URL"].startswith("${FAIR_WHEELHOUSE_URL:-http://127.0.0.1:")
    # ...and the Dockerfile reads every argument the override passes (an unread one does nothing)
    dockerfile = (REPO / "Dockerfile").read_text()
    for arg in args:
        assert re.search(rf"^ARG {arg}\b", dockerfile, re.MULTILINE), arg
    assert 'set -- --no-index --find-links "$WHEELHOUSE_URL"' in dockerfile


def test_grafana_waits_for_an_image_behind_a_profile():
    # No Debian package, no registry: `up` must not try to pull it unless asked to.
    assert load("docker-compose.offline.yml")["services"]["grafana"]["profiles"] == ["grafana"]


def test_compose_file_works_with_compose_v1():
    # docker-compose 1.29 (Debian's) rejects a top-level `name:`; the project name comes from .env.
    assert "name" not in load("docker-compose.yml")
    env = dict(
        line.split("=", 1)
        for line in (REPO / ".env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert env["COMPOSE_PROJECT_NAME"] == "fair"


def test_dockerfile_needs_no_frontend_from_a_registry():
    # `# syntax=...` makes BuildKit pull docker/dockerfile from Docker Hub before building anything.
    assert not re.search(r"^#\s*syntax\s*=", (REPO / "Dockerfile").read_text(), re.MULTILINE | re.IGNORECASE)


def test_scripts_parse_and_explain_themselves():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    shown = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    assert "fair-offline/python" in shown and "--mirror" in shown
    shown = subprocess.run(
        [sys.executable, str(OFFLINE / "stack_test.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--keep" in shown and "--wheelhouse" in shown


def test_stack_test_is_not_part_of_make_test():
    makefile = (REPO / "Makefile").read_text()
    test_recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE).group(0)
    assert "stack" not in test_recipe
    assert re.search(r"^stack-test:", makefile, re.MULTILINE)


def test_bootstrap_once_reuses_the_load_options_for_build():
    sys.path.insert(0, str(DEPLOY / "compose"))
    try:
        from bootstrap_once import split_command
    finally:
        sys.path.pop(0)
    boot = load("docker-compose.yml")["services"]["bootstrap"]
    cmd, env = boot["command"], boot["environment"]
    url, build = split_command(cmd, env)  # the URL comes from the environment (issue 24.5)
    assert url == "redis://redis:6379/0"
    assert build == ["fair-demo", "build", "--dir", "/var/lib/fair/demo", "--bundles", "/bundles"]
    # an explicit --redis (password-less) still wins and is dropped from the build command
    url, build = split_command(["fair-demo", "load", "--redis", "redis://x:6379/0", "--dir", "d"], {})
    assert url == "redis://x:6379/0" and build == ["fair-demo", "build", "--dir", "d"]
    with pytest.raises(ValueError):
        split_command(["fair-demo", "run", "--redis", "redis://x"], {})
    with pytest.raises(ValueError, match="FAIR_REDIS_URL"):
        split_command(["fair-demo", "load", "--dir", "d"], {})
