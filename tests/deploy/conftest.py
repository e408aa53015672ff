"""Fixtures of the deployment checks (helpers live in deploy_support.py)."""

from __future__ import annotations

import pytest
from deploy_support import require_tool


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return require_tool("prometheus")
