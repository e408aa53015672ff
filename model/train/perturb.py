"""Stochastic history perturbations for the noise-robustness objective (L_robust).

A perturbed batch keeps the clean batch's shape: item ``n`` of the perturbed history sits in the
same slot as in the clean one, so predictions and attention maps can be compared slot by slot on
the items both passes keep. The three operations model the noise of real histories:

* ``drop``: the item vanishes (its slot is masked out, like padding): a missing interaction;
* ``mask``: some of its codes become the per-level MASK code: a partially known item;
* ``substitute``: it becomes a uniformly random catalog item: an accidental / off-topic click.

Each real item is perturbed with probability ``rate``, the operation drawn uniformly from ``ops``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class Perturbed(NamedTuple):
    codes: torch.Tensor  # [B,N,L] perturbed codes (MASK = codebook_size where masked)
    items: torch.Tensor  # [B,N] perturbed item indices (-1 where dropped or masked: an unknown item)
    item_mask: torch.Tensor  # [B,N] real items left after dropping
    kept: torch.Tensor  # [B,N] real AND untouched items: where clean and perturbed passes are compared


def perturb_history(
    codes: torch.Tensor,
    items: torch.Tensor,
    item_mask: torch.Tensor,
    item_codes: torch.Tensor,
    mask_code: int,
    rate: float,
    ops: Sequence[str] = ("drop", "mask", "substitute"),
    generator: torch.Generator | None = None,
) -> Perturbed:
    """Perturb left-padded histories (codes [B,N,L], item indices [B,N]). ``item_codes`` [num_items, L]
    is the catalog's code table. A masked item also loses its identity (item index -1): with its ID
    still there, hiding some of its codes would hide nothing.

    ``rate == 0`` (or no ops) is the identity: same codes, same mask, every real item kept.
    """
    B, N, L = codes.shape
    dev = codes.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=dev)

    hit = item_mask & (rand(B, N) < rate) if ops else torch.zeros_like(item_mask)
    op = torch.randint(len(ops) or 1, (B, N), generator=generator, device=dev)
    names = list(ops)

    def chosen(name: str) -> torch.Tensor:
        return hit & (op == names.index(name)) if name in names else torch.zeros_like(hit)

    out = codes.clone()
    # mask: one random level always, every other level with probability 1/2
    level_hit = (rand(B, N, L) < 0.5) | (
        torch.arange(L, device=dev) == torch.randint(L, (B, N, 1), generator=generator, device=dev)
    )
    out = torch.where(chosen("mask")[..., None] & level_hit, torch.full_like(out, mask_code), out)
    # substitute: the codes of a uniformly drawn catalog item
    random_items = torch.randint(item_codes.size(0), (B, N), generator=generator, device=dev)
    out = torch.where(chosen("substitute")[..., None], item_codes.to(dev)[random_items], out)
    dropped = chosen("drop")
    out = torch.where(dropped[..., None], torch.zeros_like(out), out)  # padding codes are 0
    new_items = torch.where(chosen("substitute"), random_items, items)
    new_items = torch.where(dropped | chosen("mask"), torch.full_like(items, -1), new_items)
    return Perturbed(out, new_items, item_mask & ~dropped, item_mask & ~hit)
