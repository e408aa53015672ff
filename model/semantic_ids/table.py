"""``SemanticIdTable``: the item id <-> code tuple mapping, saved as a versioned ``.npz`` file.

numpy only: the service loads this from a bundle and must not import torch.
A table built by ``fair-sid build`` also keeps its fitted quantizer (``quantizer``: plain arrays,
``model.semantic_ids.assign``), so a bundle can give items added after training their semantic ID;
it is not part of ``sha256()`` (which names the codes), and tables without one load as before.
Every code of every level (the collision-separating last level included) lies in
``[0, codebook_size)``, so the model has one output vocabulary of size ``codebook_size`` per level.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
QUANTIZER_PREFIX = "quantizer_"  # .npz keys of the quantizer's arrays (absent in older tables)


class SemanticIdError(ValueError):
    """A semantic-ID table that cannot be used: wrong version, corrupt, or for another catalog."""


def catalog_hash(item_ids: list[str]) -> str:
    """sha256 of the ordered item ids: identifies the catalog a table was built for."""
    return hashlib.sha256("\x1f".join(item_ids).encode()).hexdigest()


@dataclass
class SemanticIdTable:
    """Item ids (dense index order) and their unique code tuples ``codes[i] = (c_0, ..., c_{L-1})``."""

    item_ids: list[str]
    codes: np.ndarray  # [N, L] int64, unique rows
    codebook_size: int
    meta: dict = field(default_factory=dict)  # how it was built: method, levels, timings...
    # the fitted quantizer (model.semantic_ids.assign: codebooks [+ the RQ-VAE encoder]); {} when unknown
    quantizer: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    _index: dict[str, int] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.codes = np.asarray(self.codes, dtype=np.int64)
        if self.codes.ndim != 2 or self.codes.shape[0] != len(self.item_ids):
            raise SemanticIdError(
                f"codes must be [num_items={len(self.item_ids)}, L], got shape {self.codes.shape}"
            )
        if self.codes.size and (self.codes.min() < 0 or self.codes.max() >= self.codebook_size):
            raise SemanticIdError(
                f"codes must lie in [0, {self.codebook_size}), found [{self.codes.min()}, {self.codes.max()}]"
            )

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def code_length(self) -> int:
        return int(self.codes.shape[1])

    @property
    def catalog_hash(self) -> str:
        return catalog_hash(self.item_ids)

    def index_of(self) -> dict[str, int]:
        """string item id -> dense index (cached)."""
        if self._index is None:
            self._index = {iid: i for i, iid in enumerate(self.item_ids)}
        return self._index

    def check_catalog(self, item_ids: list[str], what: str = "dataset") -> None:
        """Raise ``SemanticIdError`` unless this table was built for exactly these item ids, in order."""
        if list(item_ids) == self.item_ids:
            return
        ours, theirs = set(self.item_ids), set(item_ids)
        missing, extra = len(theirs - ours), len(ours - theirs)
        raise SemanticIdError(
            f"semantic-ID table does not match the {what}: table has {len(self.item_ids)} items, "
            f"{what} has {len(item_ids)}; {missing} {what} items have no semantic ID, "
            f"{extra} table items are not in the {what}"
            + ("; same items but in another order" if not missing and not extra else "")
        )

    def sha256(self) -> str:
        """Content hash (ids + codes + codebook size): checkpoints and bundles record it."""
        h = hashlib.sha256(self.catalog_hash.encode())
        h.update(np.ascontiguousarray(self.codes, dtype=np.int64).tobytes())
        h.update(str(self.codebook_size).encode())
        return h.hexdigest()

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename) so a crash never leaves a half-written table."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    format_version=np.int64(FORMAT_VERSION),
                    item_ids=np.asarray(self.item_ids, dtype=np.str_),
                    codes=self.codes,
                    codebook_size=np.int64(self.codebook_size),
                    meta=np.asarray(json.dumps(self.meta)),
                    **{QUANTIZER_PREFIX + k: np.asarray(v) for k, v in self.quantizer.items()},
                )
            os.chmod(tmp, 0o644)  # mkstemp creates it private; a table is read by other tools and users
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SemanticIdTable:
        path = Path(path)
        if not path.exists():
            raise SemanticIdError(f"{path}: no such semantic-ID table")
        try:
            with np.load(path, allow_pickle=False) as z:
                version = int(z["format_version"])
                if version != FORMAT_VERSION:
                    raise SemanticIdError(
                        f"{path}: semantic-ID table format version {version}, this code reads {FORMAT_VERSION}"
                    )
                return cls(
                    item_ids=[str(s) for s in z["item_ids"].tolist()],
                    codes=z["codes"],
                    codebook_size=int(z["codebook_size"]),
                    meta=json.loads(str(z["meta"])),
                    quantizer={
                        k.removeprefix(QUANTIZER_PREFIX): z[k]
                        for k in z.files
                        if k.startswith(QUANTIZER_PREFIX)
                    },
                )
        except SemanticIdError:
            raise
        except Exception as exc:  # zipfile/np errors: say which file and why
            raise SemanticIdError(f"{path}: not a readable semantic-ID table ({exc})") from exc
