"""The run's optimizers: AdamW over the network, and SparseAdam over a row-sparse item-ID table.

With ``train.sparse_item_ids`` on, ``item_emb`` is an ``nn.Embedding(sparse=True)``: a step's gradient
holds only the rows the batch looked up (positives, sampled negatives, history items: ~3k of 1M), and
``torch.optim.SparseAdam`` updates those rows and their moments alone. That is "lazy" Adam: a row that
no batch touches keeps its value and moments, where AdamW keeps moving it by its decaying momentum.
Everything else (the per-item bias included: one float per item) stays in AdamW, on one schedule.

``clip_grad_norm`` is ``torch.nn.utils.clip_grad_norm_`` for a mix of dense and sparse gradients (torch's
refuses sparse ones): the total 2-norm over every gradient, the sparse ones coalesced first (an
uncoalesced gradient repeats a row once per lookup; its norm is that of the summed rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from model.fair import FAIR
from model.train.config import ConfigError, TrainConfig


class RunOptimizer:
    """AdamW over ``groups`` (the network's parameter groups) and, when ``sparse_table`` is given,
    SparseAdam over it; one learning-rate schedule ``lr_lambda`` (a factor of ``lr``) drives both."""

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        betas: tuple[float, float],
        lr_lambda: Callable[[int], float],
        sparse_table: torch.nn.Parameter | None = None,
    ) -> None:
        if sparse_table is not None:  # the table leaves AdamW's groups (identity, not equality)
            groups = [{**g, "params": [p for p in g["params"] if p is not sparse_table]} for g in groups]
        self.dense = torch.optim.AdamW(groups, lr=lr, betas=betas)
        self.sparse = (
            torch.optim.SparseAdam([sparse_table], lr=lr, betas=betas) if sparse_table is not None else None
        )
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(self.dense, lr_lambda)]
        if self.sparse is not None:
            self.schedulers.append(torch.optim.lr_scheduler.LambdaLR(self.sparse, lr_lambda))

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.dense] if self.sparse is None else [self.dense, self.sparse]

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def schedule_step(self) -> None:
        for sched in self.schedulers:
            sched.step()

    def last_lr(self) -> float:
        return float(self.schedulers[0].get_last_lr()[0])

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint keys: ``optimizer`` / ``scheduler`` (AdamW: the layout dense runs always had) and,
        row-sparse, ``sparse_optimizer`` / ``sparse_scheduler``."""
        state = {"optimizer": self.dense.state_dict(), "scheduler": self.schedulers[0].state_dict()}
        if self.sparse is not None:
            state["sparse_optimizer"] = self.sparse.state_dict()
            state["sparse_scheduler"] = self.schedulers[1].state_dict()
        return state

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        if (self.sparse is not None) != ("sparse_optimizer" in ckpt):
            have = "row-sparse" if "sparse_optimizer" in ckpt else "dense"
            want = "row-sparse" if self.sparse is not None else "dense"
            raise ValueError(
                f"the checkpoint's item-ID table was trained {have}, this run's config makes it {want}: "
                f"its config.json should say train.sparse_item_ids = {'on' if have == 'row-sparse' else 'off'}"
            )
        self.dense.load_state_dict(ckpt["optimizer"])
        self.schedulers[0].load_state_dict(ckpt["scheduler"])
        if self.sparse is not None:
            self.sparse.load_state_dict(ckpt["sparse_optimizer"])
            self.schedulers[1].load_state_dict(ckpt["sparse_scheduler"])


def row_sparse_ids(train: TrainConfig, num_items: int, distributed: bool, device: str) -> bool:
    """Whether this run trains its ID table row-sparse: ``train.sparse_ids_for``, except under DDP on
    CUDA, where DDP's sparse all-reduce goes through NCCL, which standard PyTorch builds do not
    implement (``allreduce_sparse``): ``auto`` stays dense there and ``on`` is refused. gloo (CPU) is fine."""
    want = train.sparse_ids_for(num_items)
    if want and distributed and device.startswith("cuda"):
        if train.sparse_item_ids == "on":
            raise ConfigError(
                'train.sparse_item_ids = "on" under DDP on CUDA: NCCL has no sparse all-reduce in standard '
                'PyTorch builds; use "auto" (dense there) or "off"'
            )
        return False
    return want


def make_item_table_sparse(model: FAIR) -> torch.nn.Parameter:
    """Switch ``model.item_emb`` to sparse gradients (before any DDP wrapping: DDP reads the flag to
    expect sparse gradients) and return its weight for SparseAdam."""
    if model.item_emb is None:
        raise ValueError("row-sparse item IDs need a network with an item-ID table (model.item_ids = true)")
    model.item_emb.sparse = True
    return model.item_emb.weight


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale every gradient so that their total 2-norm is at most ``max_norm``; returns the norm before
    clipping. Sparse gradients are coalesced in place (``p.grad`` replaced) before they are measured."""
    squares = []
    grads = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            squares.append(p.grad._values().float().pow(2).sum())
        else:
            squares.append(p.grad.float().pow(2).sum())
        grads.append(p.grad)
    if not squares:
        return torch.tensor(0.0)
    total = torch.stack(squares).sum().sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total
