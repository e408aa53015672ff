"""The one in-memory dataset type every tool shares.

A ``SequenceDataset`` is an item catalog (string ids + text fields) and, per user, the chronological
list of items they interacted with. Item and user ids are strings wherever a user sees them; the
dense integer index of an item is its position in ``item_ids`` and never leaves the process.

Leave-one-out protocol (as in TIGER/P5/S3-Rec): for every user the last item is the test target,
the second-to-last the validation target, the rest is training data. Histories fed to the model are
the last ``max_history`` items before the target.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

DEFAULT_MAX_HISTORY = 20


@dataclass(frozen=True)
class EvalSplit:
    """Histories and targets for one evaluation split (``valid`` or ``test``).

    ``histories[u]`` is an int array of item indices (oldest first, at most ``max_history``),
    ``targets[u]`` the item index to predict, ``users[u]`` the index of the user in the dataset.
    """

    name: str
    users: np.ndarray  # [U] int64
    histories: list[np.ndarray]  # U x [<= max_history] int64
    targets: np.ndarray  # [U] int64

    def sample(self, n: int | None, seed: int = 0) -> EvalSplit:
        """A seeded sample of ``n`` of the split's users, kept in dataset order (all when ``n`` is None or
        at least the split's size). On a catalog of a million items a full ranking costs ~25 ms per
        user, so the 1.1M users of an expanded set take hours; a run and a baseline given the same
        ``n`` and ``seed`` see the same users."""
        if n is None or n >= len(self.users):
            return self
        if n < 1:
            raise ValueError(f"a user sample needs at least 1 user, got {n}")
        keep = np.sort(np.random.default_rng(seed).choice(len(self.users), size=n, replace=False))
        return EvalSplit(
            name=self.name,
            users=self.users[keep],
            histories=[self.histories[i] for i in keep],
            targets=self.targets[keep],
        )


@dataclass
class SequenceDataset:
    """Item catalog + per-user chronological item sequences (dense item indices)."""

    name: str
    item_ids: list[str]
    # text fields of every item, each list aligned with item_ids, e.g. {"title": [...], "brand": [...]}
    item_fields: dict[str, list[str]]
    user_ids: list[str]
    sequences: list[np.ndarray]  # one int64 array of item indices per user, oldest first
    max_history: int = DEFAULT_MAX_HISTORY
    # per-item identifiers that are NOT text to embed (e.g. the Amazon ASIN): kept out of item_fields
    # so item_texts() never feeds an opaque code to the text encoder; each list aligned with item_ids
    item_meta: dict[str, list[str]] = field(default_factory=dict)
    _item_index: dict[str, int] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.user_ids) != len(self.sequences):
            raise ValueError(
                f"{self.name}: {len(self.user_ids)} user ids but {len(self.sequences)} sequences"
            )
        for fname, values in self.item_fields.items():
            if len(values) != len(self.item_ids):
                raise ValueError(
                    f"{self.name}: item field {fname!r} has {len(values)} values for {len(self.item_ids)} items"
                )
        for fname, values in self.item_meta.items():
            if len(values) != len(self.item_ids):
                raise ValueError(
                    f"{self.name}: item meta {fname!r} has {len(values)} values for {len(self.item_ids)} items"
                )
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")

    # ---- catalog -------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def item_index(self) -> dict[str, int]:
        """Map string item id -> dense index (built once, cached)."""
        if self._item_index is None:
            self._item_index = {iid: i for i, iid in enumerate(self.item_ids)}
        return self._item_index

    def item_texts(self) -> list[str]:
        """One text per item, the fields joined in a stable order; what the text encoder embeds."""
        names = list(self.item_fields)
        return [
            "; ".join(f"{n}: {self.item_fields[n][i]}" for n in names if self.item_fields[n][i])
            for i in range(self.num_items)
        ]

    def fingerprint(self) -> str:
        """sha256 over item ids and sequences: checkpoints record it to catch a data mismatch."""
        h = hashlib.sha256()
        h.update("\x1f".join(self.item_ids).encode())
        h.update(b"\x1e")
        for seq in self.sequences:
            h.update(np.asarray(seq, dtype=np.int64).tobytes())
            h.update(b"\x1d")
        return h.hexdigest()

    # ---- leave-one-out --------------------------------------------------------------------------
    def train_sequences(self) -> list[np.ndarray]:
        """Per user, all items but the last two (users with fewer than 3 items contribute nothing)."""
        return [seq[:-2] for seq in self.sequences if len(seq) >= 3]

    def eval_split(self, split: str) -> EvalSplit:
        """Histories (last ``max_history`` items before the target) and targets for valid/test."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        cut = 2 if split == "valid" else 1
        users, histories, targets = [], [], []
        for u, seq in enumerate(self.sequences):
            if len(seq) < cut + 1:
                continue
            target_pos = len(seq) - cut
            users.append(u)
            histories.append(
                np.asarray(seq[max(0, target_pos - self.max_history) : target_pos], dtype=np.int64)
            )
            targets.append(int(seq[target_pos]))
        return EvalSplit(
            name=split,
            users=np.asarray(users, dtype=np.int64),
            histories=histories,
            targets=np.asarray(targets, dtype=np.int64),
        )

    def item_popularity(self, exclude_last: int = 2) -> np.ndarray:
        """Interaction count of every item over the training part (no leakage from valid/test)."""
        counts = np.zeros(self.num_items, dtype=np.int64)
        for seq in self.sequences:
            part = seq[:-exclude_last] if exclude_last else seq
            if len(part):
                np.add.at(counts, np.asarray(part, dtype=np.int64), 1)
        return counts


class DataFormatError(ValueError):
    """Malformed input data; the message names the file and, where there is one, the line."""

    def __init__(self, path: object, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
