"""A bundle's item encoder: an item's text -> its semantic ID and the rows a cold item has, torch-free.

``fair-export --item-encoder`` ships, beside the model, the text encoder the semantic IDs were built
from (``item_encoder.onnx`` + ``item_tokenizer.json``), and ``new_items.npz``, the per-level parts of
the folded item score; the quantizer is the semantic-ID table's own (``SemanticIdTable.quantizer``).
From them an item that was not in training gets exactly what a cold catalog item (no trained ID row)
has in the bundle:

* semantic ID: the quantizer's codes for its text embedding (``model.semantic_ids.assign``), then the
  smallest collision code its prefix does not use yet (``next_collision_code``);
* output side (``item_table`` row, ``item_bias``): ``sum_l code_table[l, c_l]`` (+ ``e @ text_out`` for
  a model with the text part), ``sum_l code_bias[l, c_l]`` (``export.item_encoder.new_item_parts``);
* input side (``item_inputs`` row, what the history side adds when the item is in a user's history):
  0 (no trained ID row), or ``e @ text_in`` with the text part.

numpy + onnxruntime + tokenizers only (the serving path never imports torch); ``tokenizers`` is imported
when an encoder is loaded, so a service without it still serves everything else.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.bundle import (
    ITEM_ENCODER_FILE,
    ITEM_ENCODER_KEY,
    ITEM_TOKENIZER_FILE,
    NEW_ITEMS_FILE,
    BundleError,
    LoadedBundle,
    has_item_encoder,
    sha256_file,
)
from model.search.folded import FoldedScorer
from model.semantic_ids.assign import QuantizerError, check_quantizer, next_collision_code, quantized_prefix
from model.semantic_ids.collisions import CollisionError
from model.semantic_ids.token_feeds import token_feeds

ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a BERT-like graph may take
ENCODER_OUTPUT = "text_embedding"
ENCODE_BATCH = 32  # texts per encoder run (sorted by length: little padding)
MAX_SEQ_LENGTH = 4_096  # cap on the manifest's max_seq_length (MiniLM: 256)
MAX_EMBEDDING_DIM = 65_536


class ItemEncoderError(BundleError):
    """The served bundle cannot give new items their rows: no item encoder, or a broken one."""


class NoItemEncoder(ItemEncoderError):
    """The bundle was exported without ``--item-encoder``."""


@dataclass(frozen=True)
class NewItemRows:
    """What a new item adds to the catalog, one row per item: ``codes`` ``[N, L]`` int64, ``table``
    ``[N, D]`` / ``bias`` ``[N]`` float32 (the folded score), ``inputs`` ``[N, D]`` float32 or None (the
    bundle's graph takes no item input vectors)."""

    codes: np.ndarray
    table: np.ndarray
    bias: np.ndarray
    inputs: np.ndarray | None

    def __len__(self) -> int:
        return int(self.codes.shape[0])


class PrefixIndex:
    """Which collision codes each quantized prefix of a catalog uses, for ``assign_codes``: the catalog's
    prefixes as sorted integer keys (one ``searchsorted`` per new item, not a scan of the catalog)."""

    def __init__(self, codes: np.ndarray, vocab: int):
        self.codes = np.asarray(codes, dtype=np.int64)
        self.vocab = vocab
        levels = self.codes.shape[1] - 1
        self._packed = levels * np.log2(max(vocab, 2)) < 62
        if self._packed:
            keys = self._keys(self.codes[:, :-1])
            self._order = np.argsort(keys, kind="stable")
            self._sorted = keys[self._order]

    def _keys(self, prefixes: np.ndarray) -> np.ndarray:
        keys = np.zeros(prefixes.shape[0], dtype=np.int64)
        for col in range(prefixes.shape[1]):
            keys = keys * self.vocab + prefixes[:, col]
        return keys

    def rows_with(self, prefix: np.ndarray) -> np.ndarray:
        """The catalog codes ``[M, L]`` whose first L - 1 codes are ``prefix``."""
        if not self._packed:  # codebooks too large to pack the prefix into one int64: scan
            return self.codes[np.all(self.codes[:, :-1] == prefix[None, :], axis=1)]
        key = self._keys(prefix[None, :])[0]
        lo, hi = np.searchsorted(self._sorted, [key, key + 1])
        return self.codes[self._order[lo:hi]]


def assign_codes(
    prefixes: np.ndarray, catalog: PrefixIndex, strict: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Full semantic IDs ``[N, L]`` for the quantized ``prefixes`` ``[N, L - 1]``, in order, and which
    rows got one (``[N]`` bool): each takes the smallest collision code that neither the catalog nor an
    earlier new item with the same prefix uses, so every worker, given the same items in the same order,
    gives the same codes. A row whose prefix is full gets none (``strict``: ``CollisionError``)."""
    prefixes = np.asarray(prefixes, dtype=np.int64)
    out = np.zeros((prefixes.shape[0], prefixes.shape[1] + 1), dtype=np.int64)
    ok = np.zeros(prefixes.shape[0], dtype=bool)
    taken: dict[tuple[int, ...], list[np.ndarray]] = {}
    for i, prefix in enumerate(prefixes):
        rows = taken.setdefault(tuple(prefix.tolist()), [catalog.rows_with(prefix)])
        try:
            code = next_collision_code(np.concatenate(rows), prefix, catalog.vocab)
        except CollisionError:
            if strict:
                raise
            continue
        out[i, :-1], out[i, -1], ok[i] = prefix, code, True
        rows.append(out[i : i + 1])
    return out, ok


def encoder_key(manifest: Mapping) -> str:
    """Names the text encoder (its graph and tokenizer, by their sha256 in the manifest): embeddings
    computed for one bundle are reused by every bundle with the same encoder."""
    files = manifest.get("files") or {}
    both = f"{files.get(ITEM_ENCODER_FILE)}:{files.get(ITEM_TOKENIZER_FILE)}"
    return hashlib.sha256(both.encode()).hexdigest()[:16]


class ItemEncoder:
    """One bundle's item encoder (``load``): ``embed`` texts, ``prefixes`` of embeddings, ``rows``.

    Keeps what it needs of the bundle, not the bundle (whose arrays a replaced engine must free), and
    opens the ONNX session on the first ``embed``: a worker that only applies embeddings other workers
    stored in Redis never loads the text encoder."""

    def __init__(self, bundle: LoadedBundle, tokenizer, parts: Mapping[str, np.ndarray], threads: int = 1):
        scorer = bundle.scorer
        assert isinstance(scorer, FoldedScorer)
        self.dir, self.name, self.version = bundle.dir, bundle.name, bundle.version
        self.record = dict(bundle.manifest[ITEM_ENCODER_KEY])
        self.key = encoder_key(bundle.manifest)
        self.quantizer = bundle.table.quantizer
        self.method = str(bundle.table.meta.get("method"))
        self.levels, self.vocab, self.width = bundle.table.code_length, bundle.table.codebook_size, scorer.dim
        self.input_width = None if bundle.item_inputs is None else int(bundle.item_inputs.shape[1])
        self.tokenizer = tokenizer
        self.code_table = np.asarray(parts["code_table"], dtype=np.float32)  # [L, V, D]
        self.code_bias = np.asarray(parts["code_bias"], dtype=np.float32)  # [L, V]
        self.text_out = parts.get("text_out")  # [E, D] or None
        self.text_in = parts.get("text_in")  # [E, D] or None
        self.threads = threads
        self.dim = 0  # the embedding width: the manifest's, checked by _check
        self._session: ort.InferenceSession | None = None
        self._session_lock = threading.Lock()

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle: LoadedBundle, threads: int = 1) -> ItemEncoder:
        """The item encoder of ``bundle``; ``NoItemEncoder`` when it has none, ``ItemEncoderError`` when
        its files do not hash to the manifest's (read again here: they are first used long after the
        bundle's checks) or do not fit the bundle."""
        manifest = bundle.manifest
        if not has_item_encoder(manifest):
            raise NoItemEncoder(
                f"bundle {bundle.name} v{bundle.version} has no item encoder: export it with "
                "fair-export --item-encoder to add items without retraining"
            )
        if bundle.schema_version < 4 or not isinstance(bundle.scorer, FoldedScorer):
            raise ItemEncoderError(
                f"bundle {bundle.name} v{bundle.version}: new items need a schema 4 bundle"
            )
        record = manifest[ITEM_ENCODER_KEY]
        files = manifest.get("files") or {}
        for name in (ITEM_ENCODER_FILE, ITEM_TOKENIZER_FILE, NEW_ITEMS_FILE):
            path = bundle.dir / name
            if not path.is_file() or sha256_file(path) != files.get(name):
                raise ItemEncoderError(f"{path}: missing, or not the file the manifest lists")
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - the serve image carries it
            raise ItemEncoderError("the 'tokenizers' package is not installed: no new items") from exc
        max_len = record.get("max_seq_length")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= MAX_SEQ_LENGTH:
            raise ItemEncoderError(
                f"manifest item_encoder.max_seq_length {max_len!r} outside [1, {MAX_SEQ_LENGTH}]"
            )
        try:
            tokenizer = Tokenizer.from_file(str(bundle.dir / ITEM_TOKENIZER_FILE))
        except Exception as exc:
            raise ItemEncoderError(
                f"{bundle.dir / ITEM_TOKENIZER_FILE}: not a readable tokenizer ({exc})"
            ) from exc
        tokenizer.enable_truncation(max_length=max_len)
        tokenizer.no_padding()
        encoder = cls(bundle, tokenizer, _read_parts(bundle.dir / NEW_ITEMS_FILE), threads)
        encoder._check()
        return encoder

    def _check(self) -> None:
        levels, vocab, width = self.levels, self.vocab, self.width
        where = self.dir / NEW_ITEMS_FILE
        if self.code_table.shape != (levels, vocab, width) or self.code_bias.shape != (levels, vocab):
            raise ItemEncoderError(
                f"{where}: code tables {self.code_table.shape} / {self.code_bias.shape} do not fit the bundle "
                f"([{levels}, {vocab}, {width}] / [{levels}, {vocab}])"
            )
        dim = self.record.get("embedding_dim")
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_EMBEDDING_DIM:
            raise ItemEncoderError(f"manifest item_encoder.embedding_dim {dim!r} is not a valid width")
        self.dim = dim
        for name, part in (("text_out", self.text_out), ("text_in", self.text_in)):
            if part is not None and part.shape != (dim, width):
                raise ItemEncoderError(f"{where}: {name} {part.shape}, need [{dim}, {width}]")
        if self.text_in is not None and self.input_width != width:
            raise ItemEncoderError(
                f"{where}: text_in for a graph that takes no item input vectors of width {width}"
            )
        try:
            quantized = check_quantizer(self.quantizer, self.method, levels - 1, vocab)
        except QuantizerError as exc:
            raise ItemEncoderError(f"the bundle's semantic-ID table: {exc}") from exc
        if quantized != dim:
            raise ItemEncoderError(
                f"the quantizer takes {quantized}-wide embeddings, the encoder gives {dim}"
            )

    @property
    def session(self) -> ort.InferenceSession:
        """The text encoder's onnxruntime session, opened on first use (checked against the contract)."""
        with self._session_lock:
            if self._session is None:
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                path = self.dir / ITEM_ENCODER_FILE
                try:
                    session = ort.InferenceSession(
                        str(path), sess_options=opts, providers=["CPUExecutionProvider"]
                    )
                except Exception as exc:
                    raise ItemEncoderError(f"{path}: onnxruntime cannot load it ({exc})") from exc
                names = {i.name for i in session.get_inputs()}
                outputs = [o.name for o in session.get_outputs()]
                if not {"input_ids", "attention_mask"} <= names or not names <= set(ENCODER_INPUTS):
                    raise ItemEncoderError(f"{path}: inputs {sorted(names)}, expected {list(ENCODER_INPUTS)}")
                if outputs != [ENCODER_OUTPUT]:
                    raise ItemEncoderError(f"{path}: outputs {outputs}, expected [{ENCODER_OUTPUT!r}]")
                self._session = session
            return self._session

    # ---- computing ---------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``[N, E]`` float32 text embeddings (what ``fair-sid build`` embedded the catalog with)."""
        session = self.session
        names = [i.name for i in session.get_inputs()]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), ENCODE_BATCH):
            rows = order[start : start + ENCODE_BATCH]
            feeds = token_feeds(self.tokenizer, [texts[i] for i in rows], names)
            (emb,) = session.run([ENCODER_OUTPUT], feeds)
            if emb.shape != (len(rows), self.dim):
                raise ItemEncoderError(
                    f"the text encoder returned {emb.shape}, expected [{len(rows)}, {self.dim}]"
                )
            out[rows] = emb
        if not np.isfinite(out).all():
            raise ItemEncoderError("the text encoder returned non-finite values")
        return out

    def prefixes(self, embeddings: np.ndarray) -> np.ndarray:
        """``[N, L - 1]`` quantized codes of the embeddings (the table's quantizer)."""
        return quantized_prefix(self.quantizer, self.method, embeddings)

    def rows(self, codes: np.ndarray, embeddings: np.ndarray) -> NewItemRows:
        """The rows of items with semantic IDs ``codes`` ``[N, L]`` and text ``embeddings`` ``[N, E]``:
        what a cold item of the catalog has (module docstring)."""
        codes = np.asarray(codes, dtype=np.int64)
        levels = np.arange(codes.shape[1])
        table = self.code_table[levels, codes].astype(np.float64).sum(axis=1)  # [N, D]
        bias = self.code_bias[levels, codes].astype(np.float64).sum(axis=1)  # [N]
        emb = np.asarray(embeddings, dtype=np.float32)
        if self.text_out is not None:
            table += emb.astype(np.float64) @ np.asarray(self.text_out, dtype=np.float64)
        inputs = None
        if self.input_width is not None:
            inputs = (
                (emb @ np.asarray(self.text_in, dtype=np.float32)).astype(np.float32)
                if self.text_in is not None
                else np.zeros((codes.shape[0], self.input_width), dtype=np.float32)
            )
        return NewItemRows(codes, table.astype(np.float32), bias.astype(np.float32), inputs)


def _read_parts(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            parts = {name: z[name] for name in z.files}
    except Exception as exc:
        raise ItemEncoderError(f"{path}: not a readable .npz ({exc})") from exc
    for name in ("code_table", "code_bias"):
        if name not in parts:
            raise ItemEncoderError(f"{path}: lacks {name}")
    for name, a in parts.items():
        if a.dtype != np.float32 or not np.isfinite(a).all():
            raise ItemEncoderError(f"{path}: {name} must hold finite float32 values")
    return parts


__all__ = [
    "CollisionError",
    "ItemEncoder",
    "ItemEncoderError",
    "NewItemRows",
    "NoItemEncoder",
    "PrefixIndex",
    "assign_codes",
    "encoder_key",
]
