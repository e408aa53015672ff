"""docker-compose.yml's Redis has a memory bound that never evicts a history silently (issue 24): a
maxmemory and the noeviction policy on its command line (docs/operations.md, "Security")."""

from __future__ import annotations

import re

import yaml
from deploy_support import REPO


def test_compose_redis_has_maxmemory_and_noeviction():
    command = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    maxmemory = command[command.index("--maxmemory") + 1]
    assert re.fullmatch(r"[1-9][0-9]*([kmg]b?)?", maxmemory.lower()), maxmemory  # a limit, not 0 (none)
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
