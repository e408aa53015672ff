"""Regenerate the hash-pinned lock files the images install from (`make lock`).

Every Python package an image installs is named here with its exact version and the sha256 of each of
its files, so `pip install --require-hashes` in the Dockerfile takes exactly these files or fails: a
compromised or confused index, mirror or wheelhouse cannot slip in other code (issue 24.7). The locks
are resolved from pyproject.toml, so the package's own metadata stays the one place where dependencies
are declared; these files only freeze one resolution of it per image.

| lock | image (Dockerfile target) | Python, platform |
|---|---|---|
| build.lock.txt | `build`: the build backend for the project's own wheel | 3.11, Debian bookworm x86_64 |
| serve.lock.txt | `runtime`: the default dependencies (no torch) | 3.11, Debian bookworm x86_64 |
| serve-gpu.lock.txt | `runtime-gpu`: the same with onnxruntime-gpu instead of onnxruntime | 3.12, Ubuntu 24.04 x86_64 |
| train-VARIANT.lock.txt | `train`: default + [train] dependencies, torch left out | 3.11, Debian bookworm x86_64 |
| torch-VARIANT.lock.txt | `train`: torch alone, the VARIANT build (cpu, cu126, ...) | same |

torch has its own lock because its builds (`2.13.0+cpu`, `+cu126`) live on the PyTorch index, not on
PyPI, and pip cannot take one package from a second index without `--extra-index-url`, which would let
any package come from either. The Dockerfile installs each lock from one index with `--index-url`. Both
halves come from one resolution, so torch's dependencies are in the train lock.

Needs uv (`uv pip compile --generate-hashes`), kept out of the project's own dependencies: `make lock`
installs a pinned uv into a throwaway venv. Existing pins are kept unless `--upgrade` is given (uv
prefers the versions already in an output file), so a regeneration after a pyproject.toml change moves
only what that change needs.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PYPI = "https://pypi.org/simple"
# The page listing every torch wheel of every build (cpu, cu126, ...), each link with its sha256.
TORCH_FIND_LINKS = "https://download.pytorch.org/whl/torch/"
# The images' interpreters and C libraries: python:3.11-slim-bookworm and Debian bookworm's python3
# (3.11, glibc 2.36); nvidia/cuda:*-ubuntu24.04 (3.12, glibc 2.39). Wheels must fit these.
DEBIAN = ("3.11", "x86_64-manylinux_2_36")
UBUNTU_GPU = ("3.12", "x86_64-manylinux_2_39")
BLOCK_START = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==")


@dataclass(frozen=True)
class Lock:
    """One `uv pip compile` run: what goes in, for which interpreter, into which file."""

    name: str
    about: str
    python: tuple[str, str]


def canonical(name: str) -> str:
    """PEP 503 name: what pip compares (`Foo_Bar` == `foo-bar`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def split_blocks(text: str) -> tuple[list[str], dict[str, str]]:
    """uv's output as its leading lines and one block per package (its pin, hashes, annotations)."""
    head: list[str] = []
    blocks: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines(keepends=True):
        m = BLOCK_START.match(line)
        if m:
            current = canonical(m.group(1))
            blocks[current] = line
        elif current is None:
            head.append(line)
        elif line.startswith((" ", "\t")):
            blocks[current] += line
        else:  # a trailing comment (e.g. "The following packages were excluded")
            current = None
            head.append(line)
    return head, blocks


def header(lock: Lock, variant: str | None = None) -> str:
    python, platform = lock.python
    lines = [
        f"# {lock.about}",
        f"# Resolved for CPython {python} on {platform} from pyproject.toml; every file with its sha256.",
        "# Installed by the Dockerfile with: pip install --require-hashes --no-deps --only-binary :all: -r FILE",
        "# Do not edit by hand. Regenerate: make lock"
        + (f" TORCH_VARIANT={variant}" if variant and variant != "cpu" else "")
        + "   (deploy/requirements/lock.py; --upgrade moves every pin)",
    ]
    return "\n".join(lines) + "\n"


def compile_lock(
    uv: str,
    inputs: list[str],
    python: tuple[str, str],
    out: Path,
    preferred: list[Path],
    extra: list[str],
    opts: argparse.Namespace,
) -> str:
    """Run uv pip compile and return its output (no header, annotations kept)."""
    # uv prefers the pins of an existing output file: seed it with the current locks.
    seed = "".join(p.read_text() for p in preferred if p.exists())
    out.write_text(seed)
    cmd = [
        uv,
        "pip",
        "compile",
        *inputs,
        "--generate-hashes",
        "--no-header",
        "--only-binary",
        ":all:",  # the images install wheels only: no build step runs unlocked build requirements
        "--python-version",
        python[0],
        "--python-platform",
        python[1],
        "--index-url",
        opts.index_url,
        "--output-file",
        str(out),
        "--quiet",
        *extra,
    ]
    if opts.upgrade:
        cmd.append("--upgrade")
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return out.read_text()


def tidy(text: str, names: dict[str, str]) -> str:
    """Annotations name temporary input files; say what they stand for instead."""
    for path, label in names.items():
        text = text.replace(f"-r {path}", label).replace(f"-c {path}", label)
    return text


def torch_pin(project: dict) -> str:
    pins = [r for r in project["optional-dependencies"]["train"] if re.match(r"torch\s*==", r)]
    if len(pins) != 1:
        raise SystemExit(f"lock.py: the [train] extra must pin torch exactly once (torch==X), found {pins}")
    return pins[0].split("==", 1)[1].split("+")[0].strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lock.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--uv", default=shutil.which("uv") or "uv", help="the uv executable (default: uv on PATH)")
    p.add_argument("--index-url", default=PYPI, help=f"the package index (default {PYPI})")
    p.add_argument(
        "--torch-find-links",
        default=TORCH_FIND_LINKS,
        help=f"where the torch builds are listed: a page or a directory of wheels (default {TORCH_FIND_LINKS})",
    )
    p.add_argument("--torch-variant", default="cpu", help="the torch build: cpu (default), cu126, ...")
    p.add_argument("--upgrade", action="store_true", help="move every pin to the newest allowed release")
    p.add_argument("--out", type=Path, default=HERE, help="where the lock files go (default: next to this)")
    opts = p.parse_args(argv)

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    variant = opts.torch_variant
    torch_version = f"{torch_pin(project)}+{variant}"
    opts.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="fair-lock-") as tmp:
        t = Path(tmp)
        build_in = t / "build-system.txt"
        build_in.write_text("\n".join(pyproject["build-system"]["requires"]) + "\n")
        no_cpu_ort = t / "exclude-onnxruntime.txt"
        no_cpu_ort.write_text("onnxruntime\n")  # the GPU image has onnxruntime-gpu instead (same module)
        torch_build = t / "torch-build.txt"
        torch_build.write_text(f"torch=={torch_version}\n")
        labels = {
            str(build_in): "pyproject.toml [build-system] requires",
            str(torch_build): f"the torch build ({variant})",
        }
        locks = {
            "build": Lock("build", "The `build` stage: the build backend of the project's wheel.", DEBIAN),
            "serve": Lock("serve", "The `runtime` image: the serving core, no torch.", DEBIAN),
            "serve-gpu": Lock(
                "serve-gpu", "The `runtime-gpu` image: the serving core with onnxruntime-gpu.", UBUNTU_GPU
            ),
            "train": Lock(
                f"train-{variant}", f"The `train` image, all but torch (torch-{variant}.lock.txt).", DEBIAN
            ),
            "torch": Lock(
                f"torch-{variant}",
                f"The `train` image: torch, {variant} build, from the PyTorch index.",
                DEBIAN,
            ),
        }

        def final(lock: Lock) -> Path:
            return opts.out / f"{lock.name}.lock.txt"

        def write(lock: Lock, body: str) -> None:
            final(lock).write_text(header(lock, variant) + tidy(body, labels))
            print(f"lock.py: wrote {final(lock)}", flush=True)

        runs = [
            ("build", [str(build_in)], []),
            ("serve", ["pyproject.toml"], []),
            ("serve-gpu", ["pyproject.toml", "--extra", "gpu"], ["--excludes", str(no_cpu_ort)]),
        ]
        for key, inputs, extra in runs:
            lock = locks[key]
            body = compile_lock(opts.uv, inputs, lock.python, t / f"{key}.txt", [final(lock)], extra, opts)
            write(lock, body)

        # train and torch: one resolution (torch's dependencies land in the train lock), split in two
        train, torch = locks["train"], locks["torch"]
        body = compile_lock(
            opts.uv,
            ["pyproject.toml", "--extra", "train"],
            train.python,
            t / "train.txt",
            [final(train), final(torch)],
            ["--constraints", str(torch_build), "--find-links", opts.torch_find_links],
            opts,
        )
        head, blocks = split_blocks(body)
        if "torch" not in blocks or f"torch=={torch_version}" not in blocks["torch"]:
            raise SystemExit(f"lock.py: the resolution holds no torch=={torch_version}:\n{body}")
        torch_block = blocks.pop("torch")
        if "--hash=" not in torch_block:
            raise SystemExit(f"lock.py: uv gave no hash for torch (find-links {opts.torch_find_links})")
        write(train, "".join(head) + "".join(blocks.values()))
        write(torch, torch_block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
