"""A loaded bundle ready to serve: one onnxruntime session + the catalog, its (folded) item score, trie, popular list.

The provider list is a preference (CUDA, then CPU); onnxruntime silently drops providers it cannot
use, so we read back what the session actually runs on, log it, and expose it (``/model``,
``fair_model_info``). Spinning is off by default: with several sessions/processes on shared cores,
busy-waiting threads steal the CPU the other workers need (it cost 2x here).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
from threadpoolctl import threadpool_limits

from export.bundle import LoadedBundle, load_bundle
from model.search.inputs import graph_feeds, histories_to_inputs

log = logging.getLogger("fair.engine")


@dataclass(frozen=True)
class ModelScores:
    """One forward pass's outputs for a batch, in the order the bundle's scorer reads them
    (``history [B, D]``; a schema 2 bundle: ``code_scores [B, L, V]``, ``query [B, D]``); rows can be
    taken with ``scores[rows]`` (the batcher searches groups of rows)."""

    outputs: tuple[np.ndarray, ...]

    def __getitem__(self, rows) -> ModelScores:
        return ModelScores(tuple(o[rows] for o in self.outputs))


_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def single_threaded_blas() -> threadpool_limits:
    """Limit numpy's BLAS to one thread for the whole process (undo with ``.restore_original_limits()``).

    The exact search's ``history @ item_table.T`` is a small product per batch; a multi-threaded BLAS
    spins up its threads for it and, on cores already busy with the event loop, ONNX Runtime and Redis,
    waits for them: on the trained Beauty bundle (12k x 128 items) one batch-1 scoring took 8.0 ms with
    the default threads and 0.86 ms with one (2-core box under load). The service is one search thread
    per worker; it scales with workers and replicas, not BLAS threads. The ``ann`` search's faiss index
    gets one OpenMP thread for the same reason (faiss's own pool, which threadpoolctl does not limit).
    """
    limit_search_threads()
    return threadpool_limits(limits=1, user_api="blas")


def limit_search_threads() -> None:
    """One thread for the OpenMP-threaded libraries in the calling thread: faiss's OpenMP pool and its
    OpenMP build of OpenBLAS keep their thread count per calling thread (libgomp's per-thread ICV), so
    the limit set at startup does not reach the inference thread: that thread calls this itself."""
    faiss.omp_set_num_threads(1)
    threadpool_limits(limits=1, user_api="openmp")


def session_options(intra_op_threads: int, inter_op_threads: int, allow_spinning: bool) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spin = "1" if allow_spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return opts


@dataclass
class Engine:
    """Everything one model version needs to answer a batch; immutable once built (swapped whole)."""

    bundle: LoadedBundle
    session: ort.InferenceSession
    provider: str
    max_history: int
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    _item_json: dict[int, tuple[str, str]] = field(default_factory=dict, init=False, repr=False)

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> int:
        return self.bundle.version

    @property
    def item_index(self) -> dict[str, int]:
        return self.bundle.table.index_of()

    def item_json(self, index: int, score_json: str) -> str:
        """One item of a ``/recommend`` answer as JSON text (fields in ``RecommendedItem`` order).

        The id and code parts are encoded on first use and kept: per request only the score varies.
        """
        cached = self._item_json.get(index)
        if cached is None:
            table = self.bundle.table
            head = '{"item_id":' + _json(table.item_ids[index]) + ',"score":'
            tail = ',"semantic_id":' + _json(table.codes[index].tolist()) + "}"
            cached = self._item_json[index] = (head, tail)
        return cached[0] + score_json + cached[1]

    def forward(self, histories: Sequence[np.ndarray]) -> ModelScores:
        """Histories of item indices (oldest first, non-empty) -> the batch's ``ModelScores``.

        The graph's inputs decide the feeds (``graph_feeds``): a schema 4 bundle's ``item_inputs`` are
        gathered from its ``item_inputs.npy``, a schema 2/3 graph takes the item indices."""
        b = self.bundle
        inputs = histories_to_inputs(histories, b.table.codes, self.max_history)
        feeds = graph_feeds(inputs, b.input_names, b.item_inputs)
        return ModelScores(tuple(self.session.run(list(b.output_names), feeds)))

    def search(
        self, scores: ModelScores, beam_size: int, k: int, exclude: Sequence[np.ndarray | None] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The bundle's search mode for the whole batch: ``(items [B, k], scores [B, k])``, -1 padded.

        The mode is widened to at least the request's ``beam_size`` and ``k`` (``SearchMode.at_least``):
        exact bundles score the whole catalog (no width: ``beam_size`` plays no part); beam and ann
        bundles rescore ``max(beam_size, k, the manifest's candidates)`` candidates (ann: from the
        bundle's faiss index, ``nprobe`` lists per user).
        """
        b = self.bundle
        mode = b.search.at_least(max(beam_size, k))
        result = mode.search(b.scorer, b.trie, scores.outputs, k, exclude)
        return result.items, result.scores

    def warm_up(self, max_batch_size: int, beam_size: int, k: int) -> float:
        """Run the largest and smallest shapes once so the first real request pays no allocation cost.

        Also builds the catalog's id -> index dict here (off the event loop): built lazily by the first
        request, it would stall every request in flight on a large catalog.
        """
        t0 = time.perf_counter()
        self.bundle.table.index_of()
        n = min(self.bundle.table.num_items, self.max_history)
        full = np.arange(n, dtype=np.int64)
        for batch in sorted({1, max_batch_size}):
            scores = self.forward([full] * batch)
            self.search(scores, beam_size, k, [full] * batch)
        return time.perf_counter() - t0


def load_engine(
    path: str | Path,
    version: int | None = None,
    *,
    providers: Sequence[str] = ("CUDAExecutionProvider", "CPUExecutionProvider"),
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    allow_spinning: bool = False,
    verify: bool = True,
    signing_keys: Sequence[bytes] = (),
) -> Engine:
    """Load, verify and open a bundle (``BUNDLE_ROOT/NAME[/VERSION]``); raises ``BundleError``/ORT errors.

    With ``signing_keys`` only a bundle signed with one of them loads (``export.bundle.load_bundle``).
    onnxruntime (>= 1.27, the pyproject floor) refuses a graph whose external-data paths leave the
    bundle directory, so ``model.onnx`` cannot read files beside or above it."""
    bundle = load_bundle(path, verify=verify, version=version, signing_keys=signing_keys)
    available = set(ort.get_available_providers())
    wanted = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    session = ort.InferenceSession(
        str(bundle.model_path),
        sess_options=session_options(intra_op_threads, inter_op_threads, allow_spinning),
        providers=wanted,
    )
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    # the bundle (schema, item_inputs.npy) says what the graph must take: schema 2/3 item indices,
    # schema 4 the gathered item_inputs of an item-ID model, or codes and mask alone
    if sorted(names) != sorted(bundle.input_names) or sorted(outputs) != sorted(bundle.output_names):
        raise ValueError(
            f"{bundle.model_path}: model inputs {names} / outputs {outputs} do not match "
            f"{', '.join(bundle.input_names)} -> {', '.join(bundle.output_names)} "
            f"(a schema {bundle.schema_version} bundle)"
        )
    provider = session.get_providers()[0]
    if wanted[0] != provider:
        log.warning("asked for %s, onnxruntime runs %s", wanted[0], provider)
    log.info(
        "loaded bundle %s v%s from %s on %s (intra_op=%d inter_op=%d spinning=%s)",
        bundle.name, bundle.version, bundle.dir, provider, intra_op_threads, inter_op_threads, allow_spinning,
    )  # fmt: skip
    return Engine(bundle=bundle, session=session, provider=provider, max_history=bundle.max_history)
