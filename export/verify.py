"""Checks that an exported ``model.onnx`` computes what the PyTorch network computes.

Three gates before a bundle is renamed into place (see docs/architecture.md, "Bundle"):

1. the graph: ``onnx.checker`` (full check) and strict shape inference pass, its inputs are one of the
   contract's input sets (``model.search.inputs.GRAPH_INPUTS``), the one output is ``history [batch, D]``,
   and every focused-attention layer is a named unit in the graph;
2. numbers: onnxruntime vs PyTorch on histories of varied lengths batched together (so left padding
   is exercised), max absolute difference of ``history``. PyTorch reads the item indices (the ID lookup
   of ``FAIR.id_input``); a schema 4 graph reads the item input vectors gathered from the table the bundle
   ships (``item_inputs.npy``, ``model.search.inputs.graph_feeds``), so the gather is checked too;
3. what users see: the top-10 of the bundle's search mode (``model.search.modes``) on what is served
   (ONNX ``history`` through the folded item table) against the same mode on PyTorch's own item
   score (``code_scores`` + ``query`` through ``ItemScorer``, i.e. ``FAIR.item_logits``), identical
   (same items, same order) for the required share of users: the graph and the fold checked at once.

fp32 must pass 2 and 3; for fp16/int8 the figures are measured and recorded, not enforced (they
change the numbers by design; their offline metrics go into the manifest instead).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.onnx_export import FOCUSED_ATTENTION, attention_units, item_input_table, next_item_history
from model.evaluate.metrics import evaluation_report
from model.fair import FAIR
from model.search.inputs import GRAPH_INPUTS, ModelInputs, graph_feeds, histories_to_inputs
from model.search.item_scores import ItemScorer, Scorer
from model.search.modes.ann import AnnMode
from model.search.modes.base import SearchMode
from model.search.modes.beam import rescore
from model.search.modes.exact import ExactMode
from model.semantic_ids.table import SemanticIdTable
from model.semantic_ids.trie import CodeTrie

MAX_ABS_DIFF_FP32 = 1e-4
TOP_K = 10
MIN_TOPK_AGREEMENT = 0.99
DEFAULT_USERS = 256
BATCH = 32

# (codes, items, item_mask) -> {output name: float32 array}: ONNX gives "history" [B, D]; PyTorch also
# "code_scores" [B, L, V] and "query" [B, D], the unfolded item score's inputs
ScoresFn = Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Search:
    """How a bundle's items are ranked: the scorer it ships (a ``FoldedScorer``), the trie and the
    configured mode; ``reference`` is PyTorch's unfolded item score, what the served ranking must equal."""

    scorer: Scorer
    trie: CodeTrie
    mode: SearchMode = field(default_factory=ExactMode)
    reference: ItemScorer | None = None


class VerificationError(RuntimeError):
    """An exported model failed a check; the message says which check and by how much."""


@dataclass
class VerificationReport:
    """Figures measured by ``verify_model``; ``failures`` lists the gates that did not pass."""

    precision: str
    users: int
    max_abs_diff: float
    topk_agreement: float
    checks: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def to_manifest(self) -> dict:
        return {
            "precision": self.precision,
            "users": self.users,
            "max_abs_diff": self.max_abs_diff,
            "max_abs_diff_limit": MAX_ABS_DIFF_FP32 if self.precision == "fp32" else None,
            f"top{TOP_K}_agreement": self.topk_agreement,
            f"top{TOP_K}_agreement_min": MIN_TOPK_AGREEMENT if self.precision == "fp32" else None,
            "checks": self.checks,
        }


# ---- runners -------------------------------------------------------------------------------------------
def ort_session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    """CPU session (CUDA first where this onnxruntime build has it)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), options, providers=providers)


def onnx_fn(session: ort.InferenceSession, item_inputs: np.ndarray | None = None) -> ScoresFn:
    """The graph's outputs by name, fed as the service feeds it (``graph_feeds``: a schema 4 graph's
    ``item_inputs`` gathered from ``item_inputs`` [I, D], the bundle's ``item_inputs.npy``)."""
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]

    def run(codes: np.ndarray, items: np.ndarray, item_mask: np.ndarray) -> dict[str, np.ndarray]:
        arrays = ModelInputs(codes.astype(np.int64), items.astype(np.int64), item_mask.astype(bool))
        feeds = graph_feeds(arrays, inputs, item_inputs)
        return dict(zip(names, session.run(names, feeds), strict=True))

    return run


def torch_fn(model: FAIR) -> ScoresFn:
    """PyTorch's ``history`` (the exported computation) and, from the same forward pass, the unfolded
    item score's ``code_scores`` and ``query`` (``FAIR.next_item_scores``)."""

    def run(codes: np.ndarray, items: np.ndarray, item_mask: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            inputs = (torch.from_numpy(a) for a in (codes, items, item_mask))
            h = next_item_history(model, *inputs)
            cs, q = model.head_logits(h), model.query(h)
        return {"history": h.numpy(), "code_scores": cs.float().numpy(), "query": q.float().numpy()}

    return run


def scores_for(
    fn: ScoresFn,
    histories: Sequence[np.ndarray],
    codes_table: np.ndarray,
    max_history: int,
    batch: int = BATCH,
) -> dict[str, np.ndarray]:
    """Every output of ``fn`` for every history (``[U, ...]`` float32 by name), in batches of mixed
    lengths (left padding exercised)."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(histories), batch):
        inputs = histories_to_inputs(histories[start : start + batch], codes_table, max_history)
        for name, value in fn(*inputs).items():
            parts.setdefault(name, []).append(np.asarray(value, dtype=np.float32))
    return {name: np.concatenate(values) for name, values in parts.items()}


def top_items(
    how: Search,
    outputs: dict[str, np.ndarray],
    histories: Sequence[np.ndarray],
    k: int = TOP_K,
    scorer: Scorer | None = None,
) -> np.ndarray:
    """Top-k items per user through the bundle's search mode (on ``scorer``, default the bundle's),
    seen items excluded and the mode widened to k as when serving."""
    scorer = scorer or how.scorer
    mode = how.mode.at_least(k)
    needed = tuple(outputs[name] for name in scorer.output_names)
    if isinstance(mode, AnnMode) and scorer is not how.scorer:
        # the index is over the bundle's folded table: the reference's candidates come from it with
        # the reference's own history, and are ranked by the reference's (unfolded) item score
        proposed = mode.propose(how.scorer, outputs["history"], k, list(histories))
        return rescore(scorer, needed, proposed, k).items
    return mode.search(scorer, how.trie, needed, k, list(histories)).items


# ---- inputs ---------------------------------------------------------------------------------------------
def synthetic_histories(
    num_items: int, max_history: int, n: int = DEFAULT_USERS, seed: int = 0
) -> list[np.ndarray]:
    """Histories of every length 1..max_history in turn, random distinct catalog items."""
    rng = np.random.default_rng(seed)
    out = []
    for u in range(n):
        length = min(1 + u % max_history, num_items)
        out.append(rng.choice(num_items, size=length, replace=False).astype(np.int64))
    return out


def sample_histories(
    histories: Sequence[np.ndarray], n: int = DEFAULT_USERS, seed: int = 0
) -> list[np.ndarray]:
    """``n`` real histories spread over lengths: sorted by length, then taken at even strides."""
    usable = [np.asarray(h, dtype=np.int64) for h in histories if len(h)]
    if len(usable) <= n:
        return usable
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(usable), size=min(len(usable), 8 * n), replace=False)
    by_length = sorted(picked, key=lambda i: (len(usable[i]), i))
    stride = np.linspace(0, len(by_length) - 1, n).round().astype(int)
    chosen = [usable[by_length[i]] for i in stride]
    order = rng.permutation(n)  # mix lengths inside every batch
    return [chosen[i] for i in order]


# ---- gates ----------------------------------------------------------------------------------------------
def check_graph(path: str | os.PathLike, focused_layers: int, d_model: int) -> list[str]:
    """Gate 1. Returns the list of problems (empty = pass)."""
    problems: list[str] = []
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        return [f"onnx.checker: {exc}"]
    proto = onnx.load(str(path))
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except Exception as exc:
        return [f"shape inference: {exc}"]
    inputs = tuple(i.name for i in inferred.graph.input)
    if inputs not in GRAPH_INPUTS:
        problems.append(f"inputs are {list(inputs)}, expected one of {[list(s) for s in GRAPH_INPUTS]}")
    outputs = [o.name for o in inferred.graph.output]
    if outputs != ["history"]:
        problems.append(f"outputs are {outputs}, expected one: history")
    out = inferred.graph.output[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in out.shape.dim]
    if out.elem_type != onnx.TensorProto.FLOAT or len(dims) != 2 or dims[1] != d_model:
        problems.append(
            f"output is {onnx.TensorProto.DataType.Name(out.elem_type)} {dims}, expected FLOAT [batch, {d_model}]"
        )
    elif isinstance(dims[0], int) and dims[0] > 0:
        problems.append(f"batch axis of the output is static ({dims[0]})")
    units = attention_units(proto, FOCUSED_ATTENTION)
    if len(units) != focused_layers:
        problems.append(
            f"expected {focused_layers} named {FOCUSED_ATTENTION} units in the graph, found {len(units)}"
        )
    return problems


def compare(
    reference: ScoresFn,
    candidate: ScoresFn,
    table: SemanticIdTable,
    how: Search,
    histories: Sequence[np.ndarray],
    max_history: int,
    precision: str,
) -> VerificationReport:
    """Gates 2 and 3 (enforced for fp32 only)."""
    ref = scores_for(reference, histories, table.codes, max_history)
    got = scores_for(candidate, histories, table.codes, max_history)
    shared = [name for name in got if name in ref]  # the graph's outputs (history)
    # PyTorch's ranking by its own item score when the reference gives it, else by the bundle's scorer
    ref_scorer = how.reference if how.reference is not None and _has_outputs(ref, how.reference) else None
    if any(np.isnan(a).any() for a in (*ref.values(), *got.values())):  # e.g. NaN weights
        diff, agreement = float("nan"), 0.0
    else:
        diff = max(
            (float(np.abs(ref[n] - got[n]).max()) if got[n].size else 0.0 for n in shared), default=0.0
        )
        same = top_items(how, ref, histories, scorer=ref_scorer) == top_items(how, got, histories)
        agreement = float(same.all(axis=1).mean()) if len(same) else 1.0
    report = VerificationReport(precision, len(histories), diff, agreement)
    against = "pytorch's item score" if ref_scorer is not None else "pytorch through the same scorer"
    report.checks += [
        f"onnxruntime vs pytorch {' and '.join(shared)}",
        f"top-{TOP_K} agreement through the served search ({how.mode.name}) against {against}",
    ]
    if precision == "fp32":
        if not diff <= MAX_ABS_DIFF_FP32:
            report.failures.append(
                f"parity: max |{' and '.join(shared)} onnx - torch| = {diff:.3g} > {MAX_ABS_DIFF_FP32:g} over {len(histories)} histories"
            )
        if report.topk_agreement < MIN_TOPK_AGREEMENT:
            report.failures.append(
                f"top-{TOP_K}: identical for {report.topk_agreement:.2%} of {len(histories)} users, need >= {MIN_TOPK_AGREEMENT:.0%}"
            )
    return report


def _has_outputs(outputs: dict[str, np.ndarray], scorer: Scorer) -> bool:
    return all(name in outputs for name in scorer.output_names)


def verify_model(
    onnx_path: str | os.PathLike,
    model: FAIR,
    table: SemanticIdTable,
    how: Search,
    histories: Sequence[np.ndarray],
    max_history: int,
    precision: str = "fp32",
    item_inputs: np.ndarray | None = None,
) -> VerificationReport:
    """All gates; raises ``VerificationError`` naming each failed gate and its figure. ``item_inputs``:
    the ``[I, D]`` table a schema 4 graph's ``item_inputs`` is gathered from (what the bundle ships;
    default: ``item_input_table(model)``)."""
    cfg = model.cfg
    focused = cfg.n_layers if cfg.attention == "focused" else 0
    graph_problems = check_graph(onnx_path, focused, cfg.d_model)
    if graph_problems:
        raise VerificationError(f"{Path(onnx_path).name}: graph check failed: " + "; ".join(graph_problems))
    session = ort_session(onnx_path)
    if item_inputs is None and any(i.name == "item_inputs" for i in session.get_inputs()):
        item_inputs = item_input_table(model)
    candidate = onnx_fn(session, item_inputs)
    report = compare(torch_fn(model), candidate, table, how, histories, max_history, precision)
    report.checks.insert(0, "onnx.checker + strict shape inference + named focused-attention units")
    if report.failures:
        raise VerificationError(f"{Path(onnx_path).name} ({precision}): " + "; ".join(report.failures))
    return report


def offline_metrics(
    fn: ScoresFn,
    table: SemanticIdTable,
    how: Search,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    max_history: int,
    batch: int = 256,
) -> dict[str, float | int]:
    """Recall/NDCG@5/10 of a model (any runner) on leave-one-out histories, seen items excluded."""
    keep = [i for i, h in enumerate(histories) if len(h)]
    hist = [np.asarray(histories[i], dtype=np.int64) for i in keep]
    items = []
    for start in range(0, len(hist), batch):
        part = hist[start : start + batch]
        items.append(top_items(how, scores_for(fn, part, table.codes, max_history, batch=batch), part))
    ranked = np.concatenate(items) if items else np.zeros((0, TOP_K), dtype=np.int64)
    return evaluation_report(ranked, np.asarray(targets)[keep], table.num_items, exclude=hist)
