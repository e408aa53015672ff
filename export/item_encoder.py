"""``fair-export --item-encoder``: what a bundle needs to add items without retraining.

Three optional bundle files (``export.bundle.ITEM_ENCODER_FILES``), read by the service's
``service/new_item_encoder.py`` (numpy + onnxruntime + tokenizers, never torch):

* ``item_encoder.onnx``: the sentence-transformers model the semantic-ID table was embedded with
  (``table.meta["encoder"]``: the bundled all-MiniLM-L6-v2, or a local model directory), traced with its
  pooling and normalisation, ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``) int64
  ``[batch, tokens]`` -> ``text_embedding`` float32 ``[batch, E]``;
* ``item_tokenizer.json``: its fast tokenizer (HF ``tokenizers`` JSON), truncating at the model's
  ``max_seq_length`` as sentence-transformers does;
* ``new_items.npz``: the folded item score split by level, so a new item's row is a sum of lookups.
  ``query_vectors`` is ``h @ M`` (``export.fold``) and a cold item's stacked vector is its L code
  embeddings (+ its projected text), so its folded row is
  ``sum_l code_table[l, c_l]`` with ``code_table[l] = E_l @ M_l.T`` ``[V, D]`` (``M_l``: level l's
  ``D`` columns of ``M``), its bias ``sum_l code_bias[l, c_l]`` (``head_bias``), and with the text part
  ``+ e @ text_out``, ``text_out = W_text.T @ M_id.T`` ``[E, D]``; its input vector (``item_inputs``) is
  ``e @ text_in``, ``text_in = W_text.T``, or 0 without the text part (``FAIR.id_vectors`` of an item
  without a trained ID row).

The quantizer is the semantic-ID table's (``SemanticIdTable.quantizer``, saved by ``fair-sid build``),
so the export refuses a table without one. With ``--data`` the export checks what it wrote: the ONNX
encoder against sentence-transformers (cosine of the embeddings) and the whole path (tokenizer, ONNX,
quantizer) against the table's own codes on catalog texts; the rates go into the manifest.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export.bundle import ITEM_ENCODER_FILE, ITEM_TOKENIZER_FILE, NEW_ITEMS_FILE
from model.fair import FAIR
from model.semantic_ids.assign import QuantizerError, check_quantizer, quantized_prefix
from model.semantic_ids.encoders import DEFAULT_MODEL_ID, _local_model_id, bundled_model_path
from model.semantic_ids.table import SemanticIdTable
from model.semantic_ids.token_feeds import token_feeds

OUTPUT_NAME = "text_embedding"  # not "embedding": BERT's graph already has a value of that name
POOLINGS = ("mean", "cls")
CHECK_ITEMS = 256  # catalog texts the export encodes to check the path against the table's codes
MIN_COSINE = 0.9999  # ONNX vs sentence-transformers embeddings
MIN_PREFIX_AGREEMENT = 0.9  # share of checked catalog items whose quantized codes equal the table's


class ItemEncoderExportError(RuntimeError):
    """The bundle cannot get an item encoder (unknown encoder, no quantizer, a failed check)."""


def encoder_dir(table: SemanticIdTable) -> Path:
    """The sentence-transformers model directory the table's embeddings came from (its ``meta``)."""
    model_id = str(table.meta.get("encoder", ""))
    if model_id == DEFAULT_MODEL_ID:
        return bundled_model_path()
    if model_id.startswith("local:"):
        path = Path(model_id.removeprefix("local:").rsplit("@", 1)[0])
        if not path.is_dir() or _local_model_id(path) != model_id:
            raise ItemEncoderExportError(
                f"the semantic-ID table was embedded with {model_id}, which is no longer there unchanged"
            )
        return path
    raise ItemEncoderExportError(
        f"the semantic-ID table's embeddings came from {model_id or 'an unrecorded encoder'}, not a text "
        "encoder fair-export can ship (build it with fair-sid build's bundled MiniLM or --encoder DIR)"
    )


def check_table(table: SemanticIdTable) -> tuple[str, int]:
    """The table's quantizer method and the embedding width it takes, after checking it holds a usable
    quantizer."""
    method = str(table.meta.get("method"))
    if not table.quantizer:
        raise ItemEncoderExportError(
            "the semantic-ID table holds no quantizer (built before fair-sid kept it, or not by fair-sid "
            "build): rebuild it with fair-sid build and retrain to add items without retraining"
        )
    try:
        width = check_quantizer(table.quantizer, method, table.code_length - 1, table.codebook_size)
    except QuantizerError as exc:
        raise ItemEncoderExportError(f"the semantic-ID table's quantizer: {exc}") from exc
    return method, width


class _Sentence(nn.Module):
    """Transformer -> pooling (mean over real tokens, or the first token) -> L2 normalisation."""

    def __init__(self, transformer: nn.Module, pooling: str, normalize: bool, token_types: bool):
        super().__init__()
        self.transformer = transformer
        self.pooling = pooling
        self.normalize = normalize
        self.token_types = token_types

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if self.token_types else {}
        hidden = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, **extra
        ).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1) if self.normalize else pooled


@dataclass
class SentenceModel:
    """A sentence-transformers model taken apart: the network to trace and how it reads text."""

    st: object  # sentence_transformers.SentenceTransformer
    module: _Sentence
    tokenizer: object  # tokenizers.Tokenizer, truncating at max_seq_length, no padding
    max_seq_length: int
    pooling: str
    normalize: bool
    input_names: tuple[str, ...]
    dim: int


def load_sentence_model(path: str | os.PathLike) -> SentenceModel:
    """Load a local sentence-transformers model (offline) and check it is the supported shape:
    Transformer (+ Pooling mean/cls) (+ Normalize)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    st = SentenceTransformer(str(path), device="cpu")
    modules = list(st)
    kinds = [type(m).__name__ for m in modules]
    if kinds[:1] != ["Transformer"] or not set(kinds[1:]) <= {"Pooling", "Normalize"}:
        raise ItemEncoderExportError(
            f"{path}: modules {kinds}; fair-export ships Transformer + Pooling + Normalize"
        )
    pooling = "mean"
    for m in modules[1:]:
        if type(m).__name__ == "Pooling":
            mode = getattr(m, "pooling_mode", None)  # sentence-transformers 6: a string
            pooling = mode if isinstance(mode, str) else str(m.get_config_dict().get("pooling_mode"))
    if pooling not in POOLINGS:
        raise ItemEncoderExportError(f"{path}: pooling {pooling!r}; fair-export ships {POOLINGS}")
    transformer = modules[0]
    backend = getattr(transformer.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ItemEncoderExportError(f"{path}: no fast tokenizer (tokenizer.json) to ship")
    tokenizer = Tokenizer.from_str(backend.to_str())
    tokenizer.enable_truncation(max_length=int(st.max_seq_length))
    tokenizer.no_padding()
    probe = transformer.tokenizer(["a"], return_tensors="pt")
    token_types = "token_type_ids" in probe
    names = ("input_ids", "attention_mask", *(("token_type_ids",) if token_types else ()))
    normalize = "Normalize" in kinds
    module = _Sentence(transformer.auto_model, pooling, normalize, token_types).eval()
    width = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    dim = int(width())
    return SentenceModel(st, module, tokenizer, int(st.max_seq_length), pooling, normalize, names, dim)


def _feeds(model: SentenceModel, texts: list[str]) -> dict[str, np.ndarray]:
    """Padded int64 token arrays of ``texts`` (the very padding the service does: one function)."""
    return token_feeds(model.tokenizer, texts, model.input_names)


def export_text_encoder(model: SentenceModel, path: str | os.PathLike, opset: int = 18) -> Path:
    """Trace the sentence model to ONNX at ``path`` (dynamic batch and tokens)."""
    path = Path(path)
    examples = _feeds(model, ["an example item text", "a second, longer example text for the trace"])
    args = tuple(torch.from_numpy(examples[name]) for name in model.input_names)
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (UserWarning, FutureWarning, DeprecationWarning))
        program = torch.onnx.export(
            model.module,
            args,
            dynamo=True,
            input_names=list(model.input_names),
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch, 1: tokens},) * len(args),
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    proto.producer_name = "fair-export"
    onnx.save_model(proto, path)
    return path


@torch.no_grad()
def new_item_parts(model: FAIR) -> dict[str, np.ndarray]:
    """The per-level parts of the folded item score of an item without a trained ID row (module
    docstring): ``code_table`` ``[L, V, D]``, ``code_bias`` ``[L, V]``, and with the text part
    ``text_out`` / ``text_in`` ``[E, D]``; float32, computed in float64 as ``export.fold`` is."""
    was_training = model.training
    model.eval()
    try:
        cfg = model.cfg
        L, D = cfg.num_levels, cfg.d_model
        m = model.query_vectors(torch.eye(D)).double()  # [D, L*D (+ D)]
        table = (model.level_code_table() if model.head_out is None else model.head_out).double()  # [L, V, D]
        code_table = torch.stack([table[lv] @ m[:, lv * D : (lv + 1) * D].T for lv in range(L)])
        parts = {"code_table": code_table, "code_bias": model.head_bias.double()}
        if model.text_proj is not None:
            w_text = model.text_proj.weight.double()  # [D, E]
            parts["text_out"] = w_text.T @ m[:, L * D :].T
            parts["text_in"] = w_text.T
    finally:
        model.train(was_training)
    return {k: np.ascontiguousarray(v.cpu().numpy(), dtype=np.float32) for k, v in parts.items()}


def save_parts(parts: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """``new_items.npz``: stored, not compressed (``np.savez``), as every bundle archive."""
    path = Path(path)
    with open(path, "wb") as f:
        np.savez(f, **parts)  # type: ignore[arg-type]
    return path


def check_item_encoder(
    sentence: SentenceModel, onnx_path: Path, table: SemanticIdTable, texts: list[str], method: str
) -> dict:
    """What the export measures (module docstring) on ``texts`` (row i = catalog item i): the ONNX
    encoder's cosine to sentence-transformers and the share of items whose quantized codes (tokenizer +
    ONNX + the table's quantizer, as the service computes them) equal the table's. Raises when they
    fall below ``MIN_COSINE`` / ``MIN_PREFIX_AGREEMENT``."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(texts), size=min(CHECK_ITEMS, len(texts)), replace=False))
    sample = [texts[i] for i in rows]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    ours = np.concatenate(
        [
            session.run([OUTPUT_NAME], _feeds(sentence, sample[s : s + 32]))[0]
            for s in range(0, len(sample), 32)
        ]
    )
    reference = np.asarray(sentence.st.encode(sample, batch_size=32, convert_to_numpy=True), dtype=np.float32)
    norms = np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
    cosine = float(np.min(np.einsum("nd,nd->n", ours, reference) / np.maximum(norms, 1e-12)))
    prefix = quantized_prefix(table.quantizer, method, ours)
    agreement = float(np.mean(np.all(prefix == table.codes[rows, :-1], axis=1)))
    check = {"items": len(rows), "min_cosine": round(cosine, 7), "prefix_agreement": round(agreement, 4)}
    if cosine < MIN_COSINE:
        raise ItemEncoderExportError(
            f"item encoder: ONNX vs sentence-transformers cosine {cosine:.6f} < {MIN_COSINE}"
        )
    if agreement < MIN_PREFIX_AGREEMENT:
        raise ItemEncoderExportError(
            f"item encoder: the table's codes are reproduced for {agreement:.1%} of {len(rows)} catalog items "
            f"(< {MIN_PREFIX_AGREEMENT:.0%}): the table was not built from these texts with this encoder"
        )
    return check


def write_item_encoder(
    model: FAIR, table: SemanticIdTable, texts: list[str], out_dir: str | os.PathLike, opset: int = 18
) -> dict:
    """Write the three optional files into ``out_dir`` (a bundle's staging directory) and return the
    manifest's ``item_encoder`` record. ``texts``: the catalog's item texts (the dataset's
    ``item_texts()``), row i = item i, for the check."""
    method, width = check_table(table)
    start = time.perf_counter()
    source = encoder_dir(table)
    sentence = load_sentence_model(source)
    if sentence.dim != width:
        raise ItemEncoderExportError(
            f"the encoder gives {sentence.dim}-wide embeddings, the table's quantizer takes {width}"
        )
    if model.cfg.has_item_text and model.cfg.text_dim != sentence.dim:
        raise ItemEncoderExportError(
            f"the model's text part takes {model.cfg.text_dim}-wide embeddings, the encoder gives {sentence.dim}"
        )
    out_dir = Path(out_dir)
    onnx_path = export_text_encoder(sentence, out_dir / ITEM_ENCODER_FILE, opset)
    (out_dir / ITEM_TOKENIZER_FILE).write_text(sentence.tokenizer.to_str())
    save_parts(new_item_parts(model), out_dir / NEW_ITEMS_FILE)
    check = check_item_encoder(sentence, onnx_path, table, texts, method)
    return {
        "encoder": str(table.meta.get("encoder")),
        "embedding_dim": sentence.dim,
        "max_seq_length": sentence.max_seq_length,
        "pooling": sentence.pooling,
        "normalize": sentence.normalize,
        "inputs": list(sentence.input_names),
        "quantizer": method,
        "text_part": bool(model.cfg.has_item_text),
        "check": check,
        "export_seconds": round(time.perf_counter() - start, 2),
    }


def describe(record: dict) -> str:
    """One log line about an item encoder record."""
    return json.dumps({k: record[k] for k in ("encoder", "quantizer", "check")})
