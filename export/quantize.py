"""Reduced-precision variants of an exported fp32 ``model.onnx``.

Both keep the bundle's input/output contract (int64/bool in, float32 ``history`` out), so the
service does not care which precision a bundle holds; the manifest's ``precision`` says which.

* int8: onnxruntime dynamic quantization of the weight MatMuls (weights int8 per output channel,
  activations quantized on the fly). It speeds up CPU serving but shifts the rank order below the top
  few items, which is why fair-export records an int8 bundle's own offline metrics.
* fp16: weights and activations in float16, inputs/outputs kept float32. For GPUs; on CPU
  onnxruntime falls back to casts for ops without fp16 kernels and gains little.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.float16 import convert_float_to_float16

# ops left in float32 by the fp16 conversion: numerically sensitive reductions at the output
FP16_KEEP_FP32_OPS = [
    "LogSoftmax",
    "Softmax",
    "LayerNormalization",
    "ReduceMean",
    "Pow",
    "Sqrt",
    "Reciprocal",
]


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Dynamic int8 quantization of ``src`` into ``dst`` (MatMul/Gemm with constant weights)."""
    dst = Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        # the quantizer writes helper files next to its output: keep them out of the bundle
        out = Path(tmp) / dst.name
        # its root-logger advice to pre-process is moot: the exporter already optimised and shape-inferred
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(
                Path(src),
                out,
                op_types_to_quantize=["MatMul", "Gemm"],
                per_channel=True,
                weight_type=QuantType.QInt8,
            )
        finally:
            root.setLevel(level)
        os.replace(out, dst)
    return dst


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """float16 weights/activations, float32 inputs and output (``keep_io_types``)."""
    proto = onnx.load(str(src))
    half = convert_float_to_float16(proto, keep_io_types=True, op_block_list=FP16_KEEP_FP32_OPS)
    sort_topologically(half.graph)  # the converter appends the casts around blocked ops at the end
    del half.graph.value_info[:]  # stale fp32/fp16 annotations fail strict shape inference; re-derivable
    onnx.save_model(half, str(dst))
    return Path(dst)


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (stable, in place)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError(f"graph has a cycle or a missing input near node {pending[0].name!r}")
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for node in ready:
            ordered.append(node)
            available.update(node.output)
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)
