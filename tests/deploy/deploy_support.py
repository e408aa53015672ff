"""Shared helpers of the deployment checks: the repository root and the Prometheus tools.

promtool and prometheus come from Debian's ``prometheus`` package, which ``make test`` installs
(``make tools``) where apt-get works. Where they are missing the checks FAIL with the reason: the
monitoring configuration is part of the product, so its checks are never skipped quietly.
(A plain module, not conftest.py: several test folders have a conftest, and `import conftest`
would pick whichever was imported first.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not on PATH, so this monitoring check cannot run. It ships in Debian's `prometheus` "
            "package: run `make tools` (apt-get install prometheus; `make test` does it where apt-get works) "
            "or put Prometheus 2.x binaries on PATH.",
            pytrace=False,
        )
    return path
