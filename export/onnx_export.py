"""FAIR network -> ``model.onnx`` with the bundle's input/output contract.

The graph is traced with torch's dynamo ONNX exporter from ``FAIR.forward`` at the newest item
(``last_only``) in its plain attention form (in onnxruntime it ran faster than the SDPA form). Inputs
(bundle schema 4): ``codes`` int64 ``[batch, items, L]``, for item-ID models ``item_inputs`` float32
``[batch, items, D]`` (the input vector of each history item: row i of ``item_input_table``, shipped as
``item_inputs.npy`` and gathered by the runtime, ``model.search.inputs.graph_feeds``; 0 for padding and
unknown items) and ``item_mask`` bool ``[batch, items]``; one output, ``history`` float32 ``[batch, D]``:
the final boundary state h, in which the item score is affine. Batch and items are dynamic. No
catalog-sized tensor is in the graph: the ID lookup (``[I, D]`` embeddings, trained flags, text) is the
runtime's gather, and the heads are not in the graph either: the item score is folded into one
``[I, D]`` table + ``[I]`` bias (``export.fold``) and the code heads into one affine map, shipped beside
the graph as .npy/.npz, so the service scores the whole catalog with one product, or beam candidates
with the same numbers (``model.search.folded``). ``schema=3`` still traces the older graph that takes
item indices (``items`` int64) and holds the ID tables (past ~4M items beyond protobuf's 2 GB).

Why nodes are renamed instead of wrapped in ONNX local functions: onnxruntime inlines local functions
when it loads a model anyway, and the int8 quantizer and graph optimisers only look at top-level
nodes, so a function-wrapped attention would silently stay fp32. Instead every node gets a name that
spells its module path with the module's kind, e.g. ``blocks.0:Block/attn:FocusedAttention/softmax``,
taken from the exporter's scope metadata: the focused attention of each layer is a unit in Netron,
in profiles and for ``attention_units``.
"""

from __future__ import annotations

import ast
import logging
import os
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from model.fair import FAIR, FAIRConfig
from model.search.inputs import CODE_INPUTS, ITEM_INDEX_INPUTS, ITEM_VECTOR_INPUTS

GRAPH_SCHEMAS = (3, 4)  # 4: item_inputs gathered outside the graph; 3: item indices, lookup inside
DEFAULT_SCHEMA = 4
ITEM_INPUT_CHUNK = 65_536  # items whose input vectors are computed at a time (text projection included)
DEFAULT_OPSET = 18
MIN_OPSET = 18  # the dynamo exporter writes 18+; its down-converter fails on this graph and keeps 18
OUTPUT_NAMES = ("history",)
FOCUSED_ATTENTION = "FocusedAttention"
STANDARD_ATTENTION = "Attention"
_WRAPPED = "model"  # attribute name of the network inside the export wrapper (prefix of scope names)
# exporter metadata worth keeping (scopes); stack traces and FX dumps leak local paths and bloat the file
_KEEP_METADATA = ("namespace", "pkg.torch.onnx.name_scopes", "pkg.torch.onnx.class_hierarchy")


class ExportError(RuntimeError):
    """The network cannot be exported under the bundle contract (or the exporter failed)."""


def next_item_history(
    model: FAIR,
    codes: torch.Tensor,  # [B,N,L] int64
    items: torch.Tensor | None,  # [B,N] int64 item indices (-1 = unknown), or None with id_inputs
    item_mask: torch.Tensor,  # [B,N] bool
    id_inputs: torch.Tensor | None = None,  # [B,N,D] float32 gathered item input vectors
) -> torch.Tensor:
    """``[B, D]`` float32 state at the newest item: what the exported graph computes (and what the
    verification runs in PyTorch, from the item indices), the input of the folded item score."""
    out = model.forward(codes, item_mask, plain=True, items=items, last_only=True, id_inputs=id_inputs)
    return out.history[:, -1].float()


class NextItemHistory(nn.Module):
    """The exported function of an item-ID model (schema 4): (codes, item_inputs, item_mask) -> history.
    No user token input, and no [I, D] table: the item input vectors come in gathered."""

    def __init__(self, model: FAIR) -> None:
        super().__init__()
        self.model = model  # attribute name must equal _WRAPPED

    def forward(
        self, codes: torch.Tensor, item_inputs: torch.Tensor, item_mask: torch.Tensor
    ) -> torch.Tensor:
        return next_item_history(self.model, codes, None, item_mask, id_inputs=item_inputs)


class NextItemHistoryOfCodes(nn.Module):
    """The exported function of a model without item IDs (schema 4): (codes, item_mask) -> history."""

    def __init__(self, model: FAIR) -> None:
        super().__init__()
        self.model = model

    def forward(self, codes: torch.Tensor, item_mask: torch.Tensor) -> torch.Tensor:
        return next_item_history(self.model, codes, None, item_mask)


class NextItemHistoryOfIndices(nn.Module):
    """The schema 3 exported function: (codes, items, item_mask) -> history, the ID lookup in the graph."""

    def __init__(self, model: FAIR) -> None:
        super().__init__()
        self.model = model

    def forward(self, codes: torch.Tensor, items: torch.Tensor, item_mask: torch.Tensor) -> torch.Tensor:
        return next_item_history(self.model, codes, items, item_mask)


def graph_input_names(cfg: FAIRConfig, schema: int = DEFAULT_SCHEMA) -> tuple[str, ...]:
    """The graph's inputs, in order: schema 3 ``codes, items, item_mask``; schema 4 ``codes,
    item_inputs, item_mask`` for an item-ID model, ``codes, item_mask`` without item IDs."""
    check_schema(schema)
    if schema == 3:
        return ITEM_INDEX_INPUTS
    return ITEM_VECTOR_INPUTS if cfg.has_item_ids else CODE_INPUTS


def check_schema(schema: int) -> None:
    if schema not in GRAPH_SCHEMAS:
        raise ExportError(
            f"bundle schema {schema!r} has no graph this exporter writes ({list(GRAPH_SCHEMAS)})"
        )


@torch.no_grad()
def item_input_table(model: FAIR, chunk: int = ITEM_INPUT_CHUNK) -> np.ndarray | None:
    """``[I, D]`` float32: the ID input vector of every catalog item (``FAIR.id_vectors``: the ID row,
    0 for untrained items, + the projected text), what a schema 4 graph's ``item_inputs`` gathers
    (``item_inputs.npy``); None for a model without item IDs. ``chunk`` items at a time."""
    if model.item_emb is None:
        return None
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n, d = model.cfg.num_items, model.cfg.d_model
    table = np.empty((n, d), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            rows = torch.arange(start, stop, device=model.item_emb.weight.device)
            table[start:stop] = model.id_vectors(rows).float().cpu().numpy()
    finally:
        model.train(was_training)
    return table


def check_exportable(cfg: FAIRConfig) -> None:
    """Configurations the bundle contract cannot express are refused before any tracing."""
    if cfg.user_buckets > 0:
        raise ExportError(
            f"model has a hashed user token (user_buckets={cfg.user_buckets}); the bundle's model "
            "inputs are codes + item_mask only, so such a model cannot be served"
        )


def check_opset(opset: int) -> None:
    """Refuse opsets the exporter cannot write: it would silently keep 18 and the manifest would lie."""
    if opset < MIN_OPSET:
        raise ExportError(
            f"opset {opset} is not supported: torch's exporter writes opset >= {MIN_OPSET} and cannot "
            f"convert this graph down (use --opset {MIN_OPSET} or higher)"
        )


def onnx_opset(proto: onnx.ModelProto) -> int:
    """The default-domain (ai.onnx) opset a model imports."""
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def example_inputs(cfg: FAIRConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trace inputs ``(codes, items, item_mask)`` whose batch/items sizes are distinct from each other,
    from L and from 1.

    The exporter specialises an axis whose example size equals a constant it meets (or 1), which
    would silently make that axis static.
    """
    taken = {1, cfg.num_levels, cfg.codebook_size, cfg.d_model, cfg.num_items, cfg.text_dim}
    batch = next(n for n in range(2, 100) if n not in taken)
    items = next(n for n in range(batch + 1, 100) if n not in taken)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.codebook_size, (batch, items, cfg.num_levels), generator=gen)
    item_mask = torch.ones(batch, items, dtype=torch.bool)
    item_mask[0, : items // 2] = False  # one left-padded row, so masking is traced with real data
    item_ids = torch.randint(0, max(cfg.num_items, 1), (batch, items), generator=gen)
    item_ids[~item_mask] = -1
    return codes, item_ids, item_mask


def io_spec(cfg: FAIRConfig, schema: int = DEFAULT_SCHEMA) -> tuple[list[dict], list[dict]]:
    """The manifest's ``inputs`` / ``outputs`` entries (names, dtypes, shapes with named dynamic axes)."""
    spec = {
        "codes": {"name": "codes", "dtype": "int64", "shape": ["batch", "items", cfg.num_levels]},
        "items": {"name": "items", "dtype": "int64", "shape": ["batch", "items"]},
        "item_inputs": {"name": "item_inputs", "dtype": "float32", "shape": ["batch", "items", cfg.d_model]},
        "item_mask": {"name": "item_mask", "dtype": "bool", "shape": ["batch", "items"]},
    }
    inputs = [spec[name] for name in graph_input_names(cfg, schema)]
    outputs = [{"name": "history", "dtype": "float32", "shape": ["batch", cfg.d_model]}]
    return inputs, outputs


def module_labels(model: nn.Module) -> dict[str, str]:
    """Qualified module name -> kind used in node names; attention modules are labelled by their form."""
    labels = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if hasattr(module, "focused") and hasattr(module, "qkv"):
            labels[name] = FOCUSED_ATTENTION if module.focused else STANDARD_ATTENTION
        else:
            labels[name] = type(module).__name__
    return labels


def _metadata(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _scope_path(scopes: list[str], labels: dict[str, str]) -> str:
    """['', 'model.blocks.0', 'model.blocks.0.attn', 'linear'] -> 'blocks.0:Block/attn:FocusedAttention'."""
    parts, parent = [], _WRAPPED
    for scope in scopes[1:-1]:  # first: the wrapper itself, last: the aten op
        qualified = scope.removeprefix(_WRAPPED + ".")
        local = scope.removeprefix(parent + ".")
        parts.append(f"{local}:{labels.get(qualified, 'Module')}")
        parent = scope
    return "/".join(parts)


def name_nodes_by_scope(proto: onnx.ModelProto, labels: dict[str, str]) -> None:
    """Rename every node ``<module path with kinds>/<op>`` (in place) and drop bulky metadata.

    Nodes the exporter left without scope (e.g. a Split it inserted) take the scope of the node that
    produces their first input, so a unit is never interrupted by an anonymous node.
    """
    producer_scope: dict[str, str] = {}
    used: set[str] = set()
    for node in proto.graph.node:  # topological order: producers come first
        meta = _metadata(node)
        scopes = (
            ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
            if "pkg.torch.onnx.name_scopes" in meta
            else None
        )
        if scopes:
            path = _scope_path(scopes, labels)
        else:
            path = next((producer_scope[i] for i in node.input if i in producer_scope), "")
        op = node.name.removeprefix("node_") or node.op_type
        name = f"{path}/{op}" if path else op
        while name in used:
            name += "_"
        used.add(name)
        node.name = name
        for out in node.output:
            producer_scope[out] = path
        keep = [(p.key, p.value) for p in node.metadata_props if p.key in _KEEP_METADATA]
        del node.metadata_props[:]
        for key, value in keep:
            node.metadata_props.add(key=key, value=value)
    for value in list(proto.graph.input) + list(proto.graph.output):
        keep = [(p.key, p.value) for p in value.metadata_props if p.key in _KEEP_METADATA]
        del value.metadata_props[:]
        for key, val in keep:
            value.metadata_props.add(key=key, value=val)


def _example_item_inputs(model: FAIR, items: torch.Tensor) -> torch.Tensor:
    """Trace example of ``item_inputs`` [B, N, D]: the ``item_input_table`` rows of ``items`` (0 for -1)."""
    known = (items >= 0)[..., None]
    rows = model.id_vectors(items.clamp(min=0).reshape(-1)).reshape(*items.shape, -1)
    return (rows * known.to(rows.dtype)).float()


def attention_units(proto: onnx.ModelProto, kind: str = FOCUSED_ATTENTION) -> dict[str, list[onnx.NodeProto]]:
    """Nodes of every attention module of ``kind``, keyed by its scope (e.g. ``blocks.0:Block/attn``)."""
    marker = f":{kind}/"
    units: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in proto.graph.node:
        if marker in node.name:
            units[node.name.split(marker)[0]].append(node)
    return dict(units)


def export_onnx(
    model: FAIR,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
    schema: int = DEFAULT_SCHEMA,
) -> Path:
    """Trace ``next_item_history`` to ``path`` (dynamic batch/items), scope-named nodes; the graph's
    inputs are those of bundle ``schema`` (``graph_input_names``)."""
    check_exportable(model.cfg)
    check_opset(opset)
    names = graph_input_names(model.cfg, schema)
    path = Path(path)
    wrapper: nn.Module
    if names == ITEM_VECTOR_INPUTS:
        wrapper = NextItemHistory(model)
    elif names == CODE_INPUTS:
        wrapper = NextItemHistoryOfCodes(model)
    else:
        wrapper = NextItemHistoryOfIndices(model)
    wrapper.eval()
    batch, items = torch.export.Dim("batch"), torch.export.Dim("items")
    # no_grad, not inference_mode: under inference_mode the dynamo exporter silently changes mode
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        # the exporter's chatter (axis renames, pytree deprecations) is not the user's business
        warnings.simplefilter("ignore", (UserWarning, FutureWarning, DeprecationWarning))
        codes, item_ids, item_mask = example_inputs(model.cfg)
        examples = {"codes": codes, "items": item_ids, "item_mask": item_mask}
        if "item_inputs" in names:
            examples["item_inputs"] = _example_item_inputs(model, item_ids)
        try:
            program = torch.onnx.export(
                wrapper,
                tuple(examples[name] for name in names),
                dynamo=True,
                input_names=list(names),
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={name: {0: batch, 1: items} for name in names},
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    proto = program.model_proto
    if onnx_opset(proto) != opset:
        raise ExportError(f"asked for opset {opset}, the exporter wrote opset {onnx_opset(proto)}")
    name_nodes_by_scope(proto, module_labels(model))
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=str(value))
    proto.producer_name = "fair-export"
    onnx.save_model(proto, path)
    return path
