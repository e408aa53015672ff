"""Helpers of the service tests: a real bundle exported by ``fair-export`` from a tiny run, a live server.

The bundle comes from the real exporter (``export.cli.main``) run on a tiny fair-train-shaped run
directory (``tests/export/tiny_export.build_tiny_run``, offered to other parts' tests for this).
Version 2 is written with ``export.bundle.write_bundle`` from version 1's files and manifest with
another popular list: reload tests need a second version, not a second (slow) trace.

Redis: the embedded server in a temporary directory, or ``FAIR_TEST_REDIS_URL`` when set (keys then
get a per-session prefix so a shared server is not clobbered).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from tiny_export import TINY_MAX_HISTORY, build_tiny_run, write_tiny_data  # noqa: E402

from export.bundle import MANIFEST_FILE, load_bundle, write_bundle  # noqa: E402
from export.cli import main as export_main  # noqa: E402
from model.data.dataset import SequenceDataset  # noqa: E402
from model.data.loading import load_dataset  # noqa: E402
from model.fair import FAIR  # noqa: E402
from model.semantic_ids.table import SemanticIdTable  # noqa: E402
from model.semantic_ids.trie import CodeTrie  # noqa: E402
from model.train.checkpoint import load_model  # noqa: E402
from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402

ADMIN_TOKEN = "test-admin-token"
MAX_HISTORY = TINY_MAX_HISTORY
HISTORY_MAX_ITEMS = 12  # the shared server trims stored histories to this


@dataclass
class TinyBundle:
    model_dir: Path  # BUNDLE_ROOT/NAME, versions 1 and 2
    model: FAIR
    table: SemanticIdTable
    trie: CodeTrie
    popular: np.ndarray
    dataset: SequenceDataset


def build_tiny_bundle(tmp: Path) -> TinyBundle:
    run = build_tiny_run(tmp / "run")
    root = tmp / "bundles"
    assert export_main(["--run", str(run), "--out", str(root), "--name", "tiny", "--users", "32"]) == 0
    v1 = load_bundle(root / "tiny" / "1")
    manifest = {k: v for k, v in v1.manifest.items() if k not in ("schema_version", "version", "files")}
    np.save(tmp / "popular-v2.npy", v1.popular[::-1].copy())
    files = {name: v1.dir / name for name in v1.manifest["files"]}
    files["popular.npy"] = tmp / "popular-v2.npy"
    write_bundle(root / "tiny", manifest, files, version=2)
    assert (root / "tiny" / "2" / MANIFEST_FILE).is_file()
    model, _ = load_model(run / "best.pt")
    dataset = load_dataset(write_tiny_data(tmp / "data", v1.table), max_history=MAX_HISTORY)
    return TinyBundle(root / "tiny", model.eval(), v1.table, v1.trie, v1.popular, dataset)


class LiveServer:
    """The real app under a real uvicorn in a background thread (own event loop), on a free port."""

    def __init__(self, settings: Settings):
        self.app = create_app(settings)
        self.settings = settings
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def state(self):
        return self.app.state.fair


def make_settings(tiny_bundle: TinyBundle, redis_settings: dict, **overrides) -> Settings:
    values = dict(
        bundle=tiny_bundle.model_dir,
        admin_token=ADMIN_TOKEN,
        max_batch_size=16,
        max_wait_ms=2.0,
        default_beam_size=10,
        intra_op_threads=1,
        inter_op_threads=1,
        providers=["CPUExecutionProvider"],
        # the 2 test cores are shared with other jobs: generous deadlines, tests that need short ones set them
        request_timeout_ms=30_000,
        redis_timeout_ms=5_000,
    )
    values.update(redis_settings)
    values.update(overrides)
    return Settings(**values)


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """``/metrics`` as {(sample name, frozenset of label items): value}."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(metrics: dict, _name: str, **labels) -> float:
    """One sample's value (0.0 when the series has not been created yet)."""
    return metrics.get((_name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)
