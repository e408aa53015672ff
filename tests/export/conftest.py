"""Fixtures: a tiny run directory and one real fp32 bundle exported from it through the CLI.

One export per session (tracing is the slow part); tests that need a bundle to damage copy it.
Other parts' tests can build their own with ``tiny_export.build_tiny_run`` + ``export.cli.main``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_export import build_tiny_run

from export.cli import main as export_main


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    return build_tiny_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory) -> Path:
    """``BUNDLE_ROOT/tiny/1``: a verified fp32 bundle of ``tiny_run``. Treat as read-only."""
    root = tmp_path_factory.mktemp("bundles")
    assert export_main(["--run", str(tiny_run), "--out", str(root), "--name", "tiny"]) == 0
    return root / "tiny" / "1"
