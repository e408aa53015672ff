"""Helpers of the tests that hold the served answers against offline numbers: a tiny run with its data,
bundles exported from it by the real ``fair-export`` CLI, and the service's top-k for every test user.

The run is ``tests/export/tiny_export.build_tiny_run`` (seed 0) and the data ``write_tiny_data`` over
its catalog, so ``fair-export --data`` records the bundle's own offline Recall/NDCG on the test split
and ``fair-eval`` can rank the same users.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from service_testlib import TINY_MAX_HISTORY, build_tiny_run, write_tiny_data

from export.bundle import LoadedBundle, load_bundle
from export.cli import main as export_main
from model.data.dataset import SequenceDataset
from model.data.loading import load_dataset
from model.evaluate.metrics import recall_ndcg
from model.semantic_ids.table import SemanticIdTable

K = 10


@dataclass
class TinyRun:
    run: Path
    data: Path
    dataset: SequenceDataset  # histories cut to the run's max_history, as fair-export and fair-eval read it
    bundles: Path  # BUNDLE_ROOT


def tiny_run_with_data(tmp: Path) -> TinyRun:
    run = build_tiny_run(tmp / "run")
    data = write_tiny_data(tmp / "data", SemanticIdTable.load(run / "semantic_ids.npz"))
    return TinyRun(run, data, load_dataset(data, max_history=TINY_MAX_HISTORY), tmp / "bundles")


def export(tiny: TinyRun, name: str, *args: str) -> LoadedBundle:
    """``fair-export --run RUN --data DATA --out BUNDLES --name NAME ARGS``; the written version 1."""
    argv = ["--run", str(tiny.run), "--data", str(tiny.data), "--out", str(tiny.bundles), "--name", name]
    assert export_main([*argv, "--users", "32", *args]) == 0
    return load_bundle(tiny.bundles / name / "1")


def split_users(dataset: SequenceDataset) -> tuple[list[np.ndarray], np.ndarray]:
    split = dataset.eval_split("test")
    return [np.asarray(h, dtype=np.int64) for h in split.histories], np.asarray(split.targets)


def served_top_k(url: str, dataset: SequenceDataset, histories: list[np.ndarray], k: int = K) -> np.ndarray:
    """The service's top-``k`` item indices ``[U, k]`` for each history (sent in the request, so Redis
    plays no part), -1 padded; every answer must come from the model, not the popular fallback."""
    index = {item: i for i, item in enumerate(dataset.item_ids)}
    out = np.full((len(histories), k), -1, dtype=np.int64)
    with httpx.Client(base_url=url, timeout=30) as client:
        for u, history in enumerate(histories):
            body = {"user_id": f"eval-{u}", "history": [dataset.item_ids[i] for i in history], "k": k}
            r = client.post("/recommend", json=body)
            assert r.status_code == 200, r.text
            answer = r.json()
            assert answer["fallback"] is None, answer
            items = [index[i["item_id"]] for i in answer["items"]]
            out[u, : len(items)] = items
    return out


def served_metrics(ranked: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    return recall_ndcg(ranked, targets, (5, 10))


def overlap_at_k(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of items two top-k lists have in common (order ignored)."""
    return float(
        np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a.tolist(), b.tolist(), strict=True)])
    )
