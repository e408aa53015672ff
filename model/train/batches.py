"""Training windows and batches over the leave-one-out training part of a ``SequenceDataset``.

A user's training sequence (all but the last two items) is cut, from its newest end, into windows
of at most ``max_history + 1`` items whose targets do not overlap: window inputs are items
``[a, b-1)``, targets items ``[a+1, b)``. One forward pass scores every boundary of a window, so an
epoch sees every training target exactly once, with as much context as ``max_history`` allows.

Batches are left-padded like serving inputs. To spend little compute on padding (2 CPU cores),
windows are shuffled, sorted by length inside pools of ``pool`` batches, cut into batches and the
batch order shuffled again. The order depends only on ``(seed, epoch)``, which makes ``--resume``
exact and lets every DDP rank compute the same order and take its own share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.data.dataset import SequenceDataset


@dataclass(frozen=True)
class Windows:
    users: np.ndarray  # [W] user index of each window (for the optional user token)
    seq: list[np.ndarray]  # W x [2 .. max_history + 1] item indices, oldest first


@dataclass
class Batch:
    codes: torch.Tensor  # [B,N,L] input item codes, left-padded
    items: torch.Tensor  # [B,N] input item indices, -1 on padding
    item_mask: torch.Tensor  # [B,N]
    target_items: torch.Tensor  # [B,N] next item at each boundary, -1 on padding
    target_codes: torch.Tensor  # [B,N,L]
    users: torch.Tensor  # [B] user index

    @property
    def valid(self) -> torch.Tensor:
        return self.target_items >= 0

    def to(self, device: str | torch.device) -> Batch:
        return Batch(
            *(
                t.to(device)
                for t in (
                    self.codes,
                    self.items,
                    self.item_mask,
                    self.target_items,
                    self.target_codes,
                    self.users,
                )
            )
        )


def trained_items(windows: Windows, num_items: int) -> np.ndarray:
    """bool [num_items]: items that occur in the training windows (as input or target). Only these get
    a trained item-ID embedding; the others are scored by their semantic-ID codes (and, in a
    ``model.item_text`` network, their projected text)."""
    seen = np.zeros(num_items, dtype=bool)
    if windows.seq:
        seen[np.concatenate(windows.seq)] = True
    return seen


def training_windows(dataset: SequenceDataset, max_history: int) -> Windows:
    users, seqs = [], []
    for u, full in enumerate(dataset.sequences):
        seq = np.asarray(full[:-2], dtype=np.int64)  # leave-one-out: last two are valid/test
        end = len(seq)
        while end >= 2:
            users.append(u)
            seqs.append(seq[max(0, end - max_history - 1) : end])
            end -= max_history
    return Windows(np.asarray(users, dtype=np.int64), seqs)


def epoch_batches(
    windows: Windows, batch_size: int, seed: int, epoch: int, world_size: int = 1, pool: int = 50
) -> list[np.ndarray]:
    """Window indices of every batch of an epoch (all ranks), a multiple of ``world_size`` long."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(windows.seq))
    lengths = np.fromiter((len(s) for s in windows.seq), dtype=np.int64, count=len(windows.seq))
    chunk = batch_size * pool
    batches: list[np.ndarray] = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    batches = [batches[i] for i in rng.permutation(len(batches))]
    usable = len(batches) - len(batches) % world_size
    return batches[:usable]


def collate(windows: Windows, index: np.ndarray, item_codes: np.ndarray) -> Batch:
    seqs = [windows.seq[i] for i in index]
    B = len(seqs)
    N = max(len(s) for s in seqs) - 1
    items = np.full((B, N), -1, dtype=np.int64)
    targets = np.full((B, N), -1, dtype=np.int64)
    for b, s in enumerate(seqs):
        n = len(s) - 1
        items[b, N - n :] = s[:-1]
        targets[b, N - n :] = s[1:]
    mask = items >= 0
    codes = np.where(mask[..., None], item_codes[np.maximum(items, 0)], 0)
    target_codes = np.where((targets >= 0)[..., None], item_codes[np.maximum(targets, 0)], 0)
    return Batch(
        torch.from_numpy(codes),
        torch.from_numpy(items),
        torch.from_numpy(mask),
        torch.from_numpy(targets),
        torch.from_numpy(target_codes),
        torch.from_numpy(windows.users[index]),
    )
