"""The model bundle: the one directory the service loads, and how it is written and checked.

Layout (in the spirit of Triton's model repository: several versions side by side)::

    BUNDLE_ROOT/NAME/VERSION/        VERSION a positive integer; the service takes the newest or a pinned one
        manifest.json                what is in the bundle, where it came from, sha256 of every other file
        model.onnx                   codes [B, N, L] int64 (+ item_inputs [B, N, D] float32, item-ID models)
                                     + item_mask [B, N] bool -> history [B, D] float32 (the state the
                                     item score is affine in); no catalog-sized tensor inside
        item_inputs.npy              item-ID models only: [I, D] float32, the input vector of every item
                                     (FAIR.id_vectors), from which the runtime gathers item_inputs
                                     (model.search.inputs.graph_feeds; 0 for padding/unknown items)
        semantic_ids.npz             SemanticIdTable (item catalog ids + code tuples)
        item_table.npy               the folded item score: score(i) = history . table[i] + bias[i],
        item_bias.npy                [I, D] / [I] float32 (model.search.folded, export.fold)
        code_heads.npz               weight [D, L, V], bias [L, V] float32: per-level code scores of a
                                     history, what the beam ranks prefixes by
        trie.npz                     CodeTrie arrays for the constrained beam search
        popular.npy                  int64 item indices, most popular first (fallback for empty histories)
        ann_index.faiss              only with search mode ann: the faiss IVF-Flat inner-product index
                                     over [item_table, item_bias] (model.search.modes.ann), read with
                                     faiss.read_index after its checksum; its parameters are the
                                     manifest's search.index
        item_encoder.onnx            optional (fair-export --item-encoder; the manifest's item_encoder
        item_tokenizer.json          record lists them): the text encoder the semantic IDs were built
        new_items.npz                with, its tokenizer, and the folded per-level code tables (+ text
                                     projections) that give an item added without retraining its row
                                     (service/new_item_encoder.py); the quantizer is the table's own

Schema 3 bundles (the same, but model.onnx takes the item indices, items [B, N] int64, and holds the
[I, D] ID tables itself; no item_inputs.npy) and schema 2 bundles (model.onnx -> code_scores + query,
item_scores.npz with the unfolded catalog side) are still read and served (``ItemScorer``). numpy + json + hashlib (+ faiss, for an ann index) only:
the service reads bundles and must never import torch. A bundle is built
in a hidden temporary directory next to its final place and renamed in one step, so a reader never
sees a half-written version and a failed export leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from export import signing
from export.signing import SIGNATURE_FILE, SignatureError
from model.search.folded import CodeHeads, FoldedScorer
from model.search.inputs import CODE_INPUTS, ITEM_INDEX_INPUTS, ITEM_VECTOR_INPUTS
from model.search.item_scores import ItemScorer, Scorer
from model.search.modes.ann import attach_index
from model.search.modes.base import SearchConfigError, SearchMode
from model.search.modes.registry import manifest_schema, mode_from_manifest, mode_params
from model.semantic_ids.table import SemanticIdError, SemanticIdTable
from model.semantic_ids.trie import CodeTrie

# 4: as 3, but the graph of an item-ID model takes item_inputs [B, N, D] (gathered by the runtime from
# item_inputs.npy) instead of the item indices, so it holds no catalog-sized table. 3 (still read): the
# model takes items [B, N] and outputs history [B, D]; the item score ships folded (item_table.npy +
# item_bias.npy) with the code heads (code_heads.npz). 2 (still read): the model outputs code_scores +
# query, item_scores.npz holds the unfolded catalog side. Schema 1 bundles (per-level log_probs) are
# refused with a message to re-export.
SCHEMA_VERSION = 4
READABLE_SCHEMAS = (2, 3, 4)
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
SEMANTIC_IDS_FILE = "semantic_ids.npz"
ITEM_INPUTS_FILE = "item_inputs.npy"  # schema 4, item-ID models only (graph input item_inputs)
ITEM_INPUTS_INPUT = "item_inputs"  # the graph input (and manifest "inputs" entry) it feeds
ITEM_TABLE_FILE = "item_table.npy"
ITEM_BIAS_FILE = "item_bias.npy"
CODE_HEADS_FILE = "code_heads.npz"
ITEM_SCORES_FILE = "item_scores.npz"  # schema 2
TRIE_FILE = "trie.npz"
POPULAR_FILE = "popular.npy"
ANN_INDEX_FILE = "ann_index.faiss"  # schema 3/4, search mode ann only
ANN_MODE = "ann"
# optional: what the service needs to add items without retraining (manifest key "item_encoder")
ITEM_ENCODER_FILE = "item_encoder.onnx"  # text -> embedding, the encoder the semantic IDs came from
ITEM_TOKENIZER_FILE = "item_tokenizer.json"  # its tokenizer (HF tokenizers JSON)
NEW_ITEMS_FILE = "new_items.npz"  # folded code tables [L, V, D], code bias [L, V] (+ text projections)
ITEM_ENCODER_KEY = "item_encoder"
ITEM_ENCODER_FILES = (ITEM_ENCODER_FILE, ITEM_TOKENIZER_FILE, NEW_ITEMS_FILE)
_SCHEMA_FILES = {
    2: (MODEL_FILE, SEMANTIC_IDS_FILE, ITEM_SCORES_FILE, TRIE_FILE, POPULAR_FILE),
    3: (
        MODEL_FILE,
        SEMANTIC_IDS_FILE,
        ITEM_TABLE_FILE,
        ITEM_BIAS_FILE,
        CODE_HEADS_FILE,
        TRIE_FILE,
        POPULAR_FILE,
    ),
}
_SCHEMA_FILES[4] = _SCHEMA_FILES[3]  # + item_inputs.npy for a graph with an item_inputs input
BUNDLE_FILES = _SCHEMA_FILES[SCHEMA_VERSION]  # what every bundle fair-export writes holds


def bundle_files(schema: int) -> tuple[str, ...]:
    """The files a bundle of layout ``schema`` must hold besides its manifest."""
    return _SCHEMA_FILES[schema]


def manifest_input_names(manifest: Mapping) -> tuple[str, ...]:
    """The graph inputs the manifest lists (its ``inputs`` entries' names; malformed entries skipped)."""
    inputs = manifest.get("inputs")
    if not isinstance(inputs, list):
        return ()
    return tuple(str(i["name"]) for i in inputs if isinstance(i, Mapping) and "name" in i)


def takes_item_inputs(manifest: Mapping) -> bool:
    """Whether the bundle's graph takes gathered ``item_inputs`` (schema 4, item-ID models): then
    ``item_inputs.npy`` is part of the bundle."""
    schema = manifest.get("schema_version", SCHEMA_VERSION)
    return schema == 4 and ITEM_INPUTS_INPUT in manifest_input_names(manifest)


def has_item_encoder(manifest: Mapping) -> bool:
    """Whether the bundle carries the optional item encoder (``fair-export --item-encoder``): then it
    can give items added without retraining their semantic ID and folded row."""
    return isinstance(manifest.get(ITEM_ENCODER_KEY), Mapping)


def required_files(manifest: Mapping) -> tuple[str, ...]:
    """The files this manifest's bundle must hold: its layout's, plus ``item_inputs.npy`` for a graph
    that takes item input vectors, plus the index of an ``ann`` search, plus the item encoder's files
    when the manifest records one."""
    files = bundle_files(manifest.get("schema_version", SCHEMA_VERSION))
    if takes_item_inputs(manifest):
        files = (*files, ITEM_INPUTS_FILE)
    search = manifest.get("search")
    if isinstance(search, Mapping) and search.get("mode") == ANN_MODE:
        files = (*files, ANN_INDEX_FILE)
    if has_item_encoder(manifest):
        files = (*files, *ITEM_ENCODER_FILES)
    return files


PRECISIONS = ("fp32", "fp16", "int8")

# Keys every manifest carries; readers may rely on them (see docs/architecture.md, "Bundle").
REQUIRED_KEYS = (
    "schema_version",
    "name",
    "version",
    "created",
    "precision",
    "source",  # {"checkpoint": path, "checkpoint_sha256": hex, "run_dir": path | None}
    "model_config",  # FAIRConfig as a dict
    "code_length",
    "codebook_size",
    "num_items",
    "max_history",
    "sid_sha256",  # SemanticIdTable.sha256() of semantic_ids.npz
    "opset",
    "inputs",  # [{"name", "dtype", "shape"}], shape entries are ints or axis names ("batch", "items")
    "outputs",
    "search",  # {"mode": a registered search mode, + every mode parameter}: how the service ranks
    "files",  # {file name: sha256 hex} for every file but manifest.json
    "metrics",  # offline metrics of this bundle / its run ({} when none were available)
    "verification",  # what fair-export checked and measured ({} with --no-verify)
    "exporter",  # {"name": "fair-export", "version": ...}
)
_STAGING_PREFIX = ".staging-"


class BundleError(ValueError):
    """A bundle that cannot be used: missing, incomplete, corrupt, or inconsistent with itself.

    ``reason`` is a short fixed word for counting refusals (the service's ``fair_bundles_refused_total``);
    the message says the rest."""

    reason = "invalid"


class BundleSignatureError(BundleError):
    """Unsigned while a signing key is configured, or signed with another key / over other bytes."""

    reason = "signature"


class BundleChecksumError(BundleError):
    """A file whose sha256 is not the manifest's, or a file missing, unlisted or not allowed."""

    reason = "checksum"


class BundleLimitError(BundleError):
    """A manifest field (or an array file) asking for more than its cap."""

    reason = "limit"


class UnsafeBundleError(BundleError):
    """A bundle directory holding a symlink or another non-file, or a file others may write."""

    reason = "unsafe_files"


# ---- caps: every manifest field that sizes an allocation or a loop in the reader --------------------
# One large value must not run a pod out of memory (issue 24.2). Generous for a 10M-item catalog: what
# the service allocates per batch from these is bounded by them (see docs/architecture.md, "Bundle").
MAX_ITEMS = 50_000_000  # num_items: the catalog (5x the 10M the project is sized for)
MAX_CODE_LENGTH = 32  # code_length L (3-4 in practice): [batch, history, L] inputs, beam levels
MAX_CODEBOOK_SIZE = 65_536  # codebook_size V (256 in practice): the beam's [batch, width, V] scores
MAX_HISTORY_ITEMS = 4_096  # max_history (20 by default): the [batch, N <= max_history, ...] inputs, warm-up
MAX_WIDTH = 8_192  # D, the model width (128 in practice): item_inputs [batch, N, D], history [batch, D]
MAX_DIM = 65_536  # any other integer dimension the manifest's inputs / outputs list (e.g. V of code_scores)
MAX_CANDIDATES = 10_000  # search.candidates (200 by default): beam width / ann candidates per user
MAX_NPROBE = 65_536  # search.nprobe: probes are bounded by the index's lists anyway (~4 sqrt(I))
MAX_SEARCH_PARAM = 65_536  # any other (future) search parameter
SEARCH_PARAM_CAPS = {"candidates": MAX_CANDIDATES, "nprobe": MAX_NPROBE}
_TOP_LEVEL_CAPS = (
    ("num_items", MAX_ITEMS),
    ("code_length", MAX_CODE_LENGTH),
    ("codebook_size", MAX_CODEBOOK_SIZE),
    ("max_history", MAX_HISTORY_ITEMS),
)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (model.onnx may be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def utc_now() -> str:
    """ISO-8601 UTC timestamp used for the manifest's ``created`` field."""
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---- finding versions -------------------------------------------------------------------------------
def list_versions(model_dir: str | os.PathLike) -> list[int]:
    """Integer versions present under ``BUNDLE_ROOT/NAME``, ascending.

    Only directories named as a positive integer count; staging directories (hidden) never do, so a
    version that is still being written is invisible.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    versions = []
    for child in model_dir.iterdir():
        if child.is_dir() and _is_version_name(child.name):
            versions.append(int(child.name))
    return sorted(versions)


def _is_version_name(name: str) -> bool:
    """``1``, ``2``, ``10``: plain ASCII digits without a leading zero, so ``str(int(name)) == name``.

    ``str.isdigit`` alone also accepts e.g. ``²`` (which ``int`` rejects) and ``01`` (whose path
    ``resolve_bundle`` would then rebuild as ``1``).
    """
    return name.isascii() and name.isdigit() and name[0] != "0"


def next_version(model_dir: str | os.PathLike) -> int:
    """The version a new export gets when none is asked for: one more than the newest."""
    versions = list_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def resolve_bundle(path: str | os.PathLike, version: int | None = None) -> Path:
    """Turn ``BUNDLE_ROOT/NAME`` (+ optional pinned version) or ``BUNDLE_ROOT/NAME/VERSION`` into a bundle dir.

    With a model directory and no version, the newest integer version is taken.
    """
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():  # already a version directory
        if version is not None and path.name != str(version):
            raise BundleError(f"{path}: is bundle version {path.name}, but version {version} was asked for")
        return path
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle directory")
    versions = list_versions(path)
    if version is not None:
        if version not in versions:
            raise BundleError(f"{path}: no version {version} (versions present: {versions or 'none'})")
        chosen = path / str(version)
    elif versions:
        chosen = path / str(versions[-1])
    else:
        raise BundleError(
            f"{path}: neither a bundle (no {MANIFEST_FILE}) nor a model directory with integer versions"
        )
    if not (chosen / MANIFEST_FILE).is_file():
        raise BundleError(f"{chosen}: no {MANIFEST_FILE}")
    return chosen


# ---- reading and checking ---------------------------------------------------------------------------
# a manifest is a few KB (an ann/auto record included); a larger one is not ours and is not read whole
MAX_MANIFEST_BYTES = 1 << 20


def read_manifest(bundle_dir: str | os.PathLike, signing_keys: Sequence[bytes] = ()) -> dict:
    """Parse and sanity-check ``manifest.json`` (schema version, required keys, precision, caps).

    With ``signing_keys``, ``manifest.sig`` must be a valid signature of the manifest's bytes by one of
    them (``export.signing``), checked on the very bytes parsed here, and the signed manifest must name
    the directory it sits in (``NAME/VERSION``): a signed bundle cannot be served under another name or
    version. A problem with the signature is a ``BundleSignatureError``.
    """
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{path}: no such manifest")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise BundleError(f"{path}: not a readable JSON manifest ({exc})") from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleLimitError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes, not a bundle manifest")
    if signing_keys:
        try:
            signing.verify(bundle_dir, raw, signing_keys)
        except SignatureError as exc:
            raise BundleSignatureError(str(exc)) from exc
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{path}: not a readable JSON manifest ({exc})") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: manifest must be a JSON object")
    schema = manifest.get("schema_version")
    if schema == 1:
        raise BundleError(
            f"{path}: a schema 1 bundle (per-level log-probs, ranked by the old objective); this version "
            f"serves schema {SCHEMA_VERSION} (item scores): re-export its checkpoint with fair-export"
        )
    if isinstance(schema, bool) or schema not in READABLE_SCHEMAS:
        raise BundleError(
            f"{path}: manifest schema_version {schema!r}, this code reads {list(READABLE_SCHEMAS)}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{path}: manifest lacks field(s) {', '.join(missing)}")
    if manifest["precision"] not in PRECISIONS:
        raise BundleError(f"{path}: precision {manifest['precision']!r} not one of {PRECISIONS}")
    if not isinstance(manifest["files"], dict):
        raise BundleError(f"{path}: field 'files' must map file name -> sha256")
    folder = Path(bundle_dir).resolve().name
    if _is_version_name(folder) and manifest["version"] != int(folder):
        raise BundleError(
            f"{path}: the manifest is version {manifest['version']!r} but the bundle directory is {folder}: "
            "a copied or renamed bundle; versions are written by fair-export, never copied"
        )
    try:
        mode_from_manifest(manifest["search"])
    except SearchConfigError as exc:
        raise BundleError(f"{path}: field 'search' must be {manifest_schema()} ({exc})") from exc
    check_limits(manifest, path)
    if signing_keys:
        real = bundle_dir.resolve()
        if manifest["name"] != real.parent.name or str(manifest["version"]) != real.name:
            raise BundleSignatureError(
                f"{path}: signed for {manifest['name']}/{manifest['version']} but found in "
                f"{real.parent.name}/{real.name}: a signed bundle is served only where it was written"
            )
    return manifest


def check_limits(manifest: Mapping, where: str | os.PathLike = MANIFEST_FILE) -> None:
    """Raise ``BundleLimitError`` naming the field, its value and its cap when a manifest field that
    sizes an allocation or a loop is not an integer in ``[1, cap]`` (the caps above)."""

    def check(field: str, value: object, cap: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BundleLimitError(f"{where}: manifest field {field} must be an integer, got {value!r}")
        if not 1 <= value <= cap:
            raise BundleLimitError(
                f"{where}: manifest field {field} = {value} is outside [1, {cap}] (the cap of this reader)"
            )

    for field, cap in _TOP_LEVEL_CAPS:
        check(field, manifest[field], cap)
    search = manifest["search"]
    for p in mode_params():  # every registered parameter the manifest records
        if p.name in search:
            check(f"search.{p.name}", search[p.name], SEARCH_PARAM_CAPS.get(p.name, MAX_SEARCH_PARAM))
    index = search.get("index")
    if isinstance(index, Mapping):  # the ann index's record (the index itself is read from its file)
        for key, cap in (("nlist", int(manifest["num_items"])), ("dim", MAX_WIDTH + 1)):
            if key in index:
                check(f"search.index.{key}", index[key], cap)
    for group in ("inputs", "outputs"):
        entries = manifest[group]
        if not isinstance(entries, list):
            raise BundleError(f"{where}: field {group!r} must be a list")
        for entry in entries:
            shape = entry.get("shape") if isinstance(entry, Mapping) else None
            for axis, dim in enumerate(shape if isinstance(shape, list) else ()):
                if isinstance(dim, int):  # named axes (batch, items) are sized per request
                    check(f"{group}[{entry.get('name')}].shape[{axis}]", dim, MAX_DIM)
    width = _model_width(manifest)
    if width is not None:
        check(f"inputs[{ITEM_INPUTS_INPUT}] width", width, MAX_WIDTH)
    for key in ("item_table", "item_ids"):
        record = manifest.get(key)
        if isinstance(record, Mapping) and "dim" in record and record["dim"] != 0:  # 0: no item IDs
            check(f"{key}.dim", record["dim"], MAX_WIDTH)


def unsafe_entries(bundle_dir: str | os.PathLike) -> list[str]:
    """What makes a version directory unsafe to read, one line each (empty: nothing).

    The directory itself must be a real directory (not a symlink), and every entry in it a regular file
    (no symlink, which would make the service read whatever it points to, no subdirectory, device or
    pipe); none of them may be writable by group or others (``chmod go-w``): those could change a bundle
    between its checks and its use, or after it was signed. ``lstat`` throughout: nothing is followed.
    """
    bundle_dir = Path(bundle_dir)
    problems = []
    try:
        st = os.lstat(bundle_dir)
    except OSError as exc:
        return [f"{bundle_dir}: cannot stat ({exc.strerror or exc})"]
    if stat.S_ISLNK(st.st_mode):
        return [f"{bundle_dir}: the version directory is a symlink; bundles are served from real directories"]
    if not stat.S_ISDIR(st.st_mode):
        return [f"{bundle_dir}: not a directory"]
    if st.st_mode & 0o022:
        problems.append(f"{bundle_dir}: writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")
    with os.scandir(bundle_dir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            est = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(est.st_mode):
                problems.append(f"{entry.name}: a symlink (not followed); bundle files must be regular files")
            elif not stat.S_ISREG(est.st_mode):
                problems.append(f"{entry.name}: not a regular file")
            elif est.st_mode & 0o022:
                problems.append(
                    f"{entry.name}: writable by group or others (mode {stat.S_IMODE(est.st_mode):o})"
                )
    return problems


def check_safe(bundle_dir: str | os.PathLike) -> None:
    """``unsafe_entries`` as a ``UnsafeBundleError`` (with how to fix the modes)."""
    problems = unsafe_entries(bundle_dir)
    if problems:
        hint = " (chmod -R go-w the version directory)" if any("writable" in p for p in problems) else ""
        raise UnsafeBundleError(f"{bundle_dir}: refused: " + "; ".join(problems) + hint)


def verify_checksums(bundle_dir: str | os.PathLike, manifest: Mapping | None = None) -> list[str]:
    """Every problem with the bundle's files, one line each; an empty list means all checksums match.

    Checks that every file the layout needs is listed, that every listed file exists and has the
    recorded sha256, and that no stray file sits in the directory unlisted (``manifest.sig`` is not
    listed: it signs the manifest, which lists the rest). ``manifest``: the one already read (and its
    signature checked) by the caller; by default it is read here.
    """
    bundle_dir = Path(bundle_dir)
    if manifest is None:
        manifest = read_manifest(bundle_dir)
    files: dict[str, str] = manifest["files"]
    needed = required_files(manifest)
    problems = [f"{name}: not listed in {MANIFEST_FILE}" for name in needed if name not in files]
    for name, expected in sorted(files.items()):
        path = bundle_dir / name
        if Path(name).name != name or name in (MANIFEST_FILE, SIGNATURE_FILE):
            problems.append(f"{name}: not a file name a bundle may list")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        else:
            actual = sha256_file(path)
            if actual != expected:
                problems.append(f"{name}: sha256 {actual} != {expected} recorded in {MANIFEST_FILE}")
    for child in sorted(bundle_dir.iterdir()):
        if child.name not in (MANIFEST_FILE, SIGNATURE_FILE) and child.name not in files:
            problems.append(f"{child.name}: present but not listed in {MANIFEST_FILE}")
    return problems


def check_stored_archives(bundle_dir: Path, names: Sequence[str]) -> None:
    """Every ``.npz`` among ``names`` must hold its arrays stored, not compressed (``np.savez``, what
    every writer here uses), so reading one never takes more memory than its size on disk: a small
    deflated member can expand to gigabytes (a zip bomb) before any shape check could run."""
    for name in names:
        if not name.endswith(".npz"):
            continue
        path = bundle_dir / name
        size = path.stat().st_size
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.infolist()
        except (OSError, zipfile.BadZipFile) as exc:
            raise BundleError(f"{path}: not a readable .npz archive ({exc})") from exc
        for m in members:
            if m.compress_type != zipfile.ZIP_STORED or m.file_size > size:
                raise BundleLimitError(
                    f"{path}: member {m.filename} is compressed ({m.file_size} bytes unpacked from "
                    f"{m.compress_size}); bundle archives hold their arrays stored (np.savez)"
                )


@dataclass
class LoadedBundle:
    """A bundle read into memory, everything but the ONNX model (the runtime loads ``model_path``)."""

    dir: Path
    manifest: dict
    model_path: Path
    table: SemanticIdTable
    trie: CodeTrie
    popular: np.ndarray  # [P] int64 item indices, most popular first
    scorer: Scorer  # the catalog side of the item score: FoldedScorer (schema 3/4) or ItemScorer (schema 2)
    search: SearchMode  # the manifest's search, configured (how the service ranks)
    # [I, D] float32 input vector of every item (item_inputs.npy): what the graph's item_inputs gathers;
    # None when the graph takes no item_inputs (schema 2/3, or a model without item IDs)
    item_inputs: np.ndarray | None = None

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def precision(self) -> str:
        return str(self.manifest["precision"])

    @property
    def max_history(self) -> int:
        return int(self.manifest["max_history"])

    @property
    def schema_version(self) -> int:
        return int(self.manifest["schema_version"])

    @property
    def input_names(self) -> tuple[str, ...]:
        """The graph's inputs (``model.search.inputs.GRAPH_INPUTS``): schema 2/3 ``codes, items,
        item_mask``; schema 4 ``codes, item_inputs, item_mask`` or, without item IDs, ``codes, item_mask``."""
        if self.schema_version < 4:
            return ITEM_INDEX_INPUTS
        return ITEM_VECTOR_INPUTS if self.item_inputs is not None else CODE_INPUTS

    @property
    def output_names(self) -> tuple[str, ...]:
        """The model outputs the scorer reads: ``("history",)`` or, schema 2, ``("code_scores", "query")``."""
        return self.scorer.output_names

    @property
    def search_mode(self) -> str:
        return self.search.name


def load_bundle(
    path: str | os.PathLike,
    verify: bool = True,
    version: int | None = None,
    signing_keys: Sequence[bytes] = (),
) -> LoadedBundle:
    """Read a bundle (``path`` as for ``resolve_bundle``); with ``verify`` every checksum is checked first.

    In this order, nothing read before it is checked: the directory holds only regular files nobody but
    their owner may write (``unsafe_entries``); with ``signing_keys`` the manifest is signed by one of
    them (then the checksums are always verified: the signature covers the files through them); the
    manifest is well-formed and within the caps (``check_limits``); the checksums; archives stored, not
    compressed. Then the parts are read and checked against each other (table vs manifest, popular
    indices in range), so the service fails at load time with one clear message rather than with wrong
    recommendations later.
    """
    bundle_dir = resolve_bundle(path, version)
    check_safe(bundle_dir)
    manifest = read_manifest(bundle_dir, signing_keys)
    if verify or signing_keys:
        problems = verify_checksums(bundle_dir, manifest)
        if problems:
            raise BundleChecksumError(f"{bundle_dir}: checksum check failed: " + "; ".join(problems))
    for name in required_files(manifest):
        if not (bundle_dir / name).is_file():
            raise BundleError(f"{bundle_dir / name}: missing")
    check_stored_archives(bundle_dir, required_files(manifest))
    try:
        table = SemanticIdTable.load(bundle_dir / SEMANTIC_IDS_FILE)
    except SemanticIdError as exc:
        raise BundleError(str(exc)) from exc
    if table.sha256() != manifest["sid_sha256"]:
        raise BundleError(
            f"{bundle_dir / SEMANTIC_IDS_FILE}: table sha256 does not match the manifest's sid_sha256"
        )
    for key, actual in (
        ("code_length", table.code_length),
        ("codebook_size", table.codebook_size),
        ("num_items", table.num_items),
    ):
        if int(manifest[key]) != actual:
            raise BundleError(f"{bundle_dir}: manifest {key}={manifest[key]} but the table has {actual}")
    trie = load_trie(bundle_dir / TRIE_FILE)
    if trie.num_items != table.num_items or trie.code_length != table.code_length:
        raise BundleError(
            f"{bundle_dir / TRIE_FILE}: trie has {trie.num_items} items of length {trie.code_length}, "
            f"the table {table.num_items} of length {table.code_length}"
        )
    popular = load_popular(bundle_dir / POPULAR_FILE, table.num_items)
    if manifest["schema_version"] == 2:
        scorer: Scorer = load_item_scores(bundle_dir / ITEM_SCORES_FILE, table)
    else:
        scorer = load_folded(bundle_dir, table)
    if ANN_INDEX_FILE in required_files(manifest):
        if not isinstance(scorer, FoldedScorer):
            raise BundleError(
                f"{bundle_dir}: search mode ann needs a schema 3 or 4 bundle (the folded table)"
            )
        load_ann_index(bundle_dir / ANN_INDEX_FILE, scorer)
    item_inputs = None
    if takes_item_inputs(manifest):
        item_inputs = load_item_inputs(bundle_dir / ITEM_INPUTS_FILE, table.num_items, _model_width(manifest))
    return LoadedBundle(
        dir=bundle_dir,
        manifest=manifest,
        model_path=bundle_dir / MODEL_FILE,
        table=table,
        trie=trie,
        popular=popular,
        scorer=scorer,
        search=mode_from_manifest(manifest["search"]),
        item_inputs=item_inputs,
    )


def _model_width(manifest: Mapping) -> int | None:
    """D of the graph's ``item_inputs`` input as the manifest lists it (None when it does not say)."""
    for entry in manifest.get("inputs") or ():
        if isinstance(entry, Mapping) and entry.get("name") == ITEM_INPUTS_INPUT:
            shape = entry.get("shape")
            if isinstance(shape, list) and len(shape) == 3 and isinstance(shape[2], int):
                return shape[2]
    return None


def save_item_inputs(item_inputs: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``item_inputs.npy`` ([I, D] float32, ``export.onnx_export.item_input_table``)."""
    path = Path(path)
    np.save(path, np.ascontiguousarray(item_inputs, dtype=np.float32))
    return path


def load_item_inputs(path: Path, num_items: int, width: int | None = None) -> np.ndarray:
    """Read a schema 4 ``item_inputs.npy`` (as ``item_table.npy`` is read): finite float32 ``[I, D]``
    with a row per catalog item (and ``D == width``, the graph's, when given); else a ``BundleError``."""
    try:
        item_inputs = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise BundleError(f"{path}: not a readable .npy array ({exc})") from exc
    if item_inputs.ndim != 2 or item_inputs.shape[0] != num_items:
        raise BundleError(f"{path}: item inputs {item_inputs.shape} do not fit {num_items} catalog items")
    if width is not None and item_inputs.shape[1] != width:
        raise BundleError(
            f"{path}: item inputs are {item_inputs.shape[1]} wide, the graph's item_inputs {width}"
        )
    if item_inputs.dtype != np.float32 or not np.isfinite(item_inputs).all():
        raise BundleError(f"{path}: must hold finite float32 values, got {item_inputs.dtype}")
    return item_inputs


def save_item_scores(scorer: ItemScorer, trained: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``item_scores.npz`` (plain arrays, no pickle); a model without item IDs gets width 0."""
    n = scorer.num_items
    vectors = scorer.vectors if scorer.vectors is not None else np.zeros((n, 0), np.float32)
    bias = scorer.bias if scorer.bias is not None else np.zeros(n, np.float32)
    path = Path(path)
    with open(path, "wb") as f:
        np.savez(
            f,
            vectors=vectors.astype(np.float32),
            bias=bias.astype(np.float32),
            trained=np.asarray(trained, dtype=bool),
        )
    return path


def load_item_scores(path: Path, table: SemanticIdTable) -> ItemScorer:
    """Read a schema 2 ``item_scores.npz`` against the catalog; any inconsistency is a ``BundleError``."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            vectors, bias, trained = arrays["vectors"], arrays["bias"], arrays["trained"]
    except Exception as exc:
        raise BundleError(f"{path}: not a readable item score table ({exc})") from exc
    n = table.num_items
    if vectors.ndim != 2 or vectors.shape[0] != n or bias.shape != (n,) or trained.shape != (n,):
        raise BundleError(
            f"{path}: vectors {vectors.shape}, bias {bias.shape}, trained {trained.shape} do not fit "
            f"{n} catalog items"
        )
    if not np.isfinite(vectors).all() or not np.isfinite(bias).all():
        raise BundleError(f"{path}: item vectors or biases are not finite")
    codes = np.asarray(table.codes, dtype=np.int64)
    if vectors.shape[1] == 0:
        return ItemScorer(codes)
    return ItemScorer(codes, vectors.astype(np.float32), bias.astype(np.float32))


def save_folded(scorer: FoldedScorer, bundle_dir: str | os.PathLike) -> None:
    """Write ``item_table.npy``, ``item_bias.npy`` and ``code_heads.npz`` (plain arrays, no pickle)."""
    bundle_dir = Path(bundle_dir)
    np.save(bundle_dir / ITEM_TABLE_FILE, np.ascontiguousarray(scorer.table, dtype=np.float32))
    np.save(bundle_dir / ITEM_BIAS_FILE, np.ascontiguousarray(scorer.bias, dtype=np.float32))
    with open(bundle_dir / CODE_HEADS_FILE, "wb") as f:
        np.savez(f, weight=scorer.heads.weight.astype(np.float32), bias=scorer.heads.bias.astype(np.float32))


def load_folded(bundle_dir: str | os.PathLike, table: SemanticIdTable) -> FoldedScorer:
    """Read the folded item score of a schema 3/4 bundle against its catalog; any problem (unreadable,
    wrong shape or dtype, not finite, not fitting the catalog's items and levels) is a ``BundleError``."""
    bundle_dir = Path(bundle_dir)
    arrays = {}
    for name in (ITEM_TABLE_FILE, ITEM_BIAS_FILE):
        try:
            arrays[name] = np.load(bundle_dir / name, allow_pickle=False)
        except Exception as exc:
            raise BundleError(f"{bundle_dir / name}: not a readable .npy array ({exc})") from exc
    try:
        with np.load(bundle_dir / CODE_HEADS_FILE, allow_pickle=False) as heads:
            weight, head_bias = heads["weight"], heads["bias"]
    except Exception as exc:
        raise BundleError(f"{bundle_dir / CODE_HEADS_FILE}: not readable code heads ({exc})") from exc
    item_table, item_bias = arrays[ITEM_TABLE_FILE], arrays[ITEM_BIAS_FILE]
    n, levels, vocab = table.num_items, table.code_length, table.codebook_size
    if item_table.ndim != 2 or item_table.shape[0] != n or item_bias.shape != (n,):
        raise BundleError(
            f"{bundle_dir / ITEM_TABLE_FILE}: table {item_table.shape} / bias {item_bias.shape} do not fit "
            f"{n} catalog items"
        )
    if weight.shape != (item_table.shape[1], levels, vocab) or head_bias.shape != (levels, vocab):
        raise BundleError(
            f"{bundle_dir / CODE_HEADS_FILE}: weight {weight.shape} / bias {head_bias.shape}, need "
            f"[{item_table.shape[1]}, {levels}, {vocab}] / [{levels}, {vocab}]"
        )
    for name, a in ((ITEM_TABLE_FILE, item_table), (ITEM_BIAS_FILE, item_bias), (CODE_HEADS_FILE, weight)):
        if a.dtype != np.float32 or not np.isfinite(a).all():
            raise BundleError(f"{bundle_dir / name}: must hold finite float32 values, got {a.dtype}")
    if head_bias.dtype != np.float32 or not np.isfinite(head_bias).all():
        raise BundleError(f"{bundle_dir / CODE_HEADS_FILE}: bias must hold finite float32 values")
    codes = np.asarray(table.codes, dtype=np.int64)
    return FoldedScorer(codes, item_table, item_bias, CodeHeads(weight, head_bias))


def save_ann_index(index: Any, path: str | os.PathLike) -> Path:
    """Write the ``ann`` search's faiss index (``faiss.write_index``)."""
    import faiss

    path = Path(path)
    faiss.write_index(index, str(path))
    return path


def load_ann_index(path: Path, scorer: FoldedScorer) -> Any:
    """Read ``ann_index.faiss`` (``faiss.read_index``; ``load_bundle`` has checked its sha256 first) and
    attach it to ``scorer``; unreadable, or not an inner-product IVF index over this folded table, is a
    ``BundleError``."""
    import faiss

    try:
        index = faiss.read_index(str(path))
    except Exception as exc:  # faiss raises RuntimeError with its C++ message
        raise BundleError(f"{path}: not a readable faiss index ({str(exc).splitlines()[0][:200]})") from exc
    try:
        attach_index(scorer, index)
    except ValueError as exc:
        raise BundleError(f"{path}: {exc}") from exc
    return index


def save_trie(trie: CodeTrie, path: str | os.PathLike) -> Path:
    """Write ``trie.npz`` from ``CodeTrie.to_arrays`` (plain arrays, no pickle)."""
    path = Path(path)
    with open(path, "wb") as f:
        np.savez(f, **trie.to_arrays())  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
    return path


def load_trie(path: str | os.PathLike) -> CodeTrie:
    """Read ``trie.npz``; any problem (missing key, corrupt zip, inconsistent arrays) is a ``BundleError``."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return CodeTrie.from_arrays(arrays)
    except Exception as exc:
        raise BundleError(f"{path}: not a readable trie ({exc})") from exc


def load_popular(path: str | os.PathLike, num_items: int) -> np.ndarray:
    """Read a popularity ranking (``popular.npy``: int item indices, most popular first) for a catalog of
    ``num_items``. The one reader of bundles and of fair-export's inputs: it must be a non-empty 1-d
    integer array of catalog indices, since the fallback for users without history serves from it
    (an empty list would answer them with nothing). Any problem is a ``BundleError`` naming the file."""
    path = Path(path)
    try:
        popular = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise BundleError(f"{path}: not a readable .npy array ({exc})") from exc
    if popular.ndim != 1 or not np.issubdtype(popular.dtype, np.integer) or not popular.size:
        raise BundleError(
            f"{path}: must be a non-empty 1-d integer array, got {popular.dtype} {popular.shape}"
        )
    if popular.min() < 0 or popular.max() >= num_items:
        raise BundleError(f"{path}: item indices must lie in [0, {num_items}) (the table's catalog)")
    return popular.astype(np.int64, copy=False)


# ---- writing ----------------------------------------------------------------------------------------
class BundleStaging:
    """A hidden directory next to the final bundle in which the files are written and verified.

    ``commit`` hashes every file, writes ``manifest.json`` and renames the directory into place in one
    step; leaving the ``with`` block without committing (an exception, a failed check) removes it, and
    also removes the ``NAME`` and ``BUNDLE_ROOT`` directories if this staging created them.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        self.path: Path | None = None
        self.committed: Path | None = None
        self._created: list[Path] = []

    def __enter__(self) -> BundleStaging:
        missing = []
        p = self.model_dir.absolute()
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            self.model_dir.mkdir(parents=True, exist_ok=True)
            self._created = missing  # deepest first: removal order
            self.path = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.model_dir))
        except OSError as exc:
            self._remove_created()
            raise BundleError(
                f"{self.model_dir}: cannot write a bundle here ({exc.strerror or exc})"
            ) from exc
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.path is not None and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        if self.committed is None:
            self._remove_created()

    def _remove_created(self) -> None:
        for d in self._created:
            try:
                d.rmdir()  # only if empty: never removes anything someone else put there
            except OSError:
                break

    def commit(self, manifest: Mapping, version: int | None = None, signing_key: bytes | None = None) -> Path:
        """Hash the staged files, write the manifest (with ``version`` and ``files``) and rename into place.

        ``version=None`` takes the next free integer; if another exporter takes it first, the next one.
        A pinned version that already exists is an error (versions are immutable). With ``signing_key``
        the manifest's signature (``manifest.sig``, ``export.signing``) is written before the rename,
        so a signed version appears with its signature. Modes: the umask's, minus group and other write
        (a reader refuses bundle files others may write: ``unsafe_entries``).
        """
        if self.path is None:
            raise RuntimeError("BundleStaging.commit outside its with-block")
        staged = sorted(p.name for p in self.path.iterdir() if p.name not in (MANIFEST_FILE, SIGNATURE_FILE))
        schema = manifest.get("schema_version", SCHEMA_VERSION)  # an older layout only when asked for
        if schema not in READABLE_SCHEMAS:
            raise BundleError(f"cannot write schema_version {schema!r}, only {list(READABLE_SCHEMAS)}")
        missing = [n for n in required_files({**manifest, "schema_version": schema}) if n not in staged]
        if missing:
            raise BundleError(f"bundle lacks file(s) {', '.join(missing)}")
        if signing_key is not None and manifest.get("name") != self.model_dir.resolve().name:
            raise BundleError(
                f"{self.model_dir}: a bundle named {manifest.get('name')!r} cannot be signed into another "
                "model directory (readers refuse a signed bundle away from its NAME/VERSION)"
            )
        files = {name: sha256_file(self.path / name) for name in staged}
        # mkdtemp made the directory private (0700); a bundle is read by the service, often as
        # another user (a container's uid), so it gets the mode an ordinary mkdir would give, and its
        # files those an ordinary create would, never writable by group or others (a umask of 002,
        # Debian's default for users with a private group, would make them so, and readers refuse that)
        umask = _current_umask() | 0o022
        os.chmod(self.path, 0o777 & ~umask)
        for name in staged:
            os.chmod(self.path / name, 0o666 & ~umask)
        for attempt in range(100):
            v = version if version is not None else next_version(self.model_dir)
            if v < 1:
                raise BundleError(f"version must be a positive integer, got {v}")
            target = self.model_dir / str(v)
            if target.exists() and version is not None:
                raise BundleError(f"{target}: version {v} already exists; bundle versions are immutable")
            full = {**manifest, "schema_version": schema, "version": v, "files": files}
            missing_keys = [k for k in REQUIRED_KEYS if k not in full]
            if missing_keys:
                raise BundleError(f"manifest lacks field(s) {', '.join(missing_keys)}")
            _write_json(self.path / MANIFEST_FILE, full)
            os.chmod(self.path / MANIFEST_FILE, 0o666 & ~umask)
            if signing_key is not None:
                sig = signing.write_signature(
                    self.path, (self.path / MANIFEST_FILE).read_bytes(), signing_key
                )
                os.chmod(sig, 0o666 & ~umask)
            try:
                os.rename(self.path, target)  # atomic; fails if target exists and is not empty
            except OSError:
                if version is not None or attempt == 99 or not target.exists():
                    raise
                continue  # another exporter took this version meanwhile: take the next
            self.committed, self.path = target, None
            return target
        raise AssertionError("unreachable")


def write_bundle(
    model_dir: str | os.PathLike,
    manifest: Mapping,
    files: Mapping[str, str | os.PathLike | bytes],
    version: int | None = None,
    signing_key: bytes | None = None,
) -> Path:
    """Write a complete bundle atomically from file contents (bytes) or existing files (copied).

    ``manifest`` is everything but ``schema_version``, ``version`` and ``files``, which are filled in;
    with ``signing_key`` the bundle is signed (``BundleStaging.commit``).
    """
    with BundleStaging(model_dir) as staging:
        assert staging.path is not None
        for name, content in files.items():
            if Path(name).name != name or name in (MANIFEST_FILE, SIGNATURE_FILE) or name.startswith("."):
                raise BundleError(f"invalid bundle file name {name!r}")
            if isinstance(content, bytes):
                (staging.path / name).write_bytes(content)
            else:
                shutil.copyfile(content, staging.path / name)
        return staging.commit(manifest, version, signing_key)


def sign_bundle(bundle_dir: str | os.PathLike, signing_key: bytes) -> Path:
    """Sign an existing version (``fair-export sign``): after it passes every check a reader makes
    without a key (safe entries, manifest, caps, checksums), write ``manifest.sig`` next to its
    manifest (atomically: a temporary file in the model directory, renamed in). Returns the signature's
    path. For bundles written before a key was configured; signing vouches for what the bundle holds
    now, so check it is the bundle you mean first (``fair-export inspect``)."""
    bundle_dir = Path(bundle_dir)
    check_safe(bundle_dir)
    raw = (bundle_dir / MANIFEST_FILE).read_bytes()
    manifest = read_manifest(bundle_dir)
    problems = verify_checksums(bundle_dir, manifest)
    if problems:
        raise BundleChecksumError(f"{bundle_dir}: not signed: checksum check failed: " + "; ".join(problems))
    if (bundle_dir / MANIFEST_FILE).read_bytes() != raw:
        raise BundleError(f"{bundle_dir}: the manifest changed while it was checked; not signed")
    real = bundle_dir.resolve()
    if manifest["name"] != real.parent.name or str(manifest["version"]) != real.name:
        raise BundleError(
            f"{bundle_dir}: the manifest names {manifest['name']}/{manifest['version']}, the directory is "
            f"{real.parent.name}/{real.name}; readers refuse a signed bundle away from where it was written"
        )
    fd, tmp = tempfile.mkstemp(prefix=f".{SIGNATURE_FILE}.", dir=bundle_dir.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(signing.signature(raw, signing_key))
        os.chmod(tmp, 0o644)
        os.replace(tmp, bundle_dir / SIGNATURE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return bundle_dir / SIGNATURE_FILE


def _current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _write_json(path: Path, obj: Mapping) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
