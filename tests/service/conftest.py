"""Fixtures for the service tests: a real bundle from a tiny FAIR model, real Redis, a live server.

The bundle is built once per session with the real pieces (synthetic dataset, SemanticIdTable,
FAIR network, ``export.onnx_export.export_onnx``, ``CodeTrie``, ``export.bundle.write_bundle``).
Version 2 reuses version 1's ONNX file with another popular list: reload tests need a second version,
not a second (slow) export.

Redis: the embedded server in a temporary directory, or ``FAIR_TEST_REDIS_URL`` when set (keys then
get a per-session prefix so a shared server is not clobbered).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from export.bundle import write_bundle
from export.onnx_export import DEFAULT_OPSET, export_onnx, io_spec
from model.data.synthetic import generate_synthetic
from model.fair import FAIR, FAIRConfig
from model.semantic_ids.table import SemanticIdTable
from model.semantic_ids.trie import CodeTrie
from service.app import create_app
from service.settings import Settings

ADMIN_TOKEN = "test-admin-token"
MAX_HISTORY = 8
HISTORY_MAX_ITEMS = 12  # the shared server trims stored histories to this


@dataclass
class TinyBundle:
    model_dir: Path  # BUNDLE_ROOT/NAME, versions 1 and 2
    model: FAIR
    table: SemanticIdTable
    trie: CodeTrie
    popular: np.ndarray
    dataset: object


def _write_version(model_dir, manifest, onnx_path, table_path, trie_path, popular, tmp) -> Path:
    pop_path = tmp / f"popular-{len(list(tmp.iterdir()))}.npy"
    np.save(pop_path, popular)
    files = {
        "model.onnx": onnx_path,
        "semantic_ids.npz": table_path,
        "trie.npz": trie_path,
        "popular.npy": pop_path,
    }
    return write_bundle(model_dir, manifest, files)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> TinyBundle:
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("bundle-src")
    dataset = generate_synthetic(num_items=60, num_users=40, seed=0, max_history=MAX_HISTORY)
    rng = np.random.default_rng(0)
    V, L = 8, 3
    flat = rng.choice(V**L, size=dataset.num_items, replace=False)
    codes = np.stack([(flat // V**p) % V for p in reversed(range(L))], axis=1)
    table = SemanticIdTable(item_ids=dataset.item_ids, codes=codes, codebook_size=V)
    trie = CodeTrie.from_codes(table.codes, V)
    cfg = FAIRConfig(num_levels=L, codebook_size=V, max_items=MAX_HISTORY, d_model=16, n_layers=1, n_heads=2)
    model = FAIR(cfg).eval()
    onnx_path = export_onnx(model, tmp / "model.onnx")
    table_path = table.save(tmp / "semantic_ids.npz")
    trie_path = tmp / "trie.npz"
    np.savez(trie_path, **trie.to_arrays())
    popular = np.argsort(-dataset.item_popularity(), kind="stable").astype(np.int64)
    inputs, outputs = io_spec(cfg)
    manifest = {
        "name": "tiny",
        "created": "2025-01-01T00:00:00+00:00",
        "precision": "fp32",
        "source": {"checkpoint": "in-memory test model", "checkpoint_sha256": "", "run_dir": None},
        "model_config": cfg.to_dict(),
        "code_length": L,
        "codebook_size": V,
        "num_items": table.num_items,
        "max_history": MAX_HISTORY,
        "sid_sha256": table.sha256(),
        "opset": DEFAULT_OPSET,
        "inputs": inputs,
        "outputs": outputs,
        "metrics": {},
        "verification": {},
        "exporter": {"name": "tests/service/conftest.py", "version": "0"},
    }
    model_dir = tmp_path_factory.mktemp("bundles") / "tiny"
    _write_version(model_dir, manifest, onnx_path, table_path, trie_path, popular, tmp)
    _write_version(model_dir, manifest, onnx_path, table_path, trie_path, popular[::-1].copy(), tmp)
    return TinyBundle(model_dir, model, table, trie, popular, dataset)


@pytest.fixture(scope="session")
def redis_settings(tmp_path_factory) -> dict:
    """Redis part of the settings: FAIR_TEST_REDIS_URL when set, else embedded in a temp dir."""
    url = os.environ.get("FAIR_TEST_REDIS_URL")
    if url:
        cluster = os.environ.get("FAIR_TEST_REDIS_CLUSTER", "").lower() in ("1", "true", "yes")
        return {
            "redis_url": url,
            "redis_cluster": cluster,
            "history_key_prefix": f"fair:test:{uuid.uuid4().hex[:8]}:",
        }
    return {"data_dir": tmp_path_factory.mktemp("redis")}


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


@pytest.fixture(scope="module")
def server(tiny_bundle, redis_settings):
    """One shared server per test module, pinned to version 1 so reload tests start from a known state."""
    settings = make_settings(
        tiny_bundle, redis_settings, bundle=tiny_bundle.model_dir / "1", history_max_items=HISTORY_MAX_ITEMS
    )
    with LiveServer(settings) as live:
        yield live


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
