"""The three training objectives: L_next, L_robust and L_mi (L = L_next + alpha L_robust + beta L_mi).

All take the model's ``FAIROutput`` (logits / history representation / attention maps at every item
boundary) and compute in float32 whatever the autocast dtype of the forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.fair import FAIR, FAIROutput


def next_item_loss(logits: torch.Tensor, target_codes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the L codes of the next item, averaged over codes and valid item boundaries.

    logits [B,N,L,V], target_codes [B,N,L], valid [B,N] (a boundary with a real next item).
    """
    V = logits.size(-1)
    ce = F.cross_entropy(logits[valid].float().reshape(-1, V), target_codes[valid].reshape(-1))
    return ce


def robust_loss(
    clean: FAIROutput, perturbed: FAIROutput, kept: torch.Tensor, attn_weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction term, attention term) of L_robust on the item slots both passes keep.

    * predictions: KL(p_clean || p_perturbed) per code, averaged over codes and kept boundaries,
      the clean distribution detached (the perturbed pass is pulled toward the clean one, never
      the reverse: the clean pass already answers to L_next);
    * attention: mean squared difference of the final attention maps (focused: A1 - lambda A2,
      which can be negative, so no KL) over (query, key) token pairs whose items are both kept,
      averaged over layers and heads; the clean maps detached as well.

    Both are exactly 0 when the perturbation is the identity and the two passes are deterministic.
    """
    kept_any = kept.any()
    log_p = torch.log_softmax(clean.logits[kept].float(), dim=-1).detach()  # [K,L,V]
    log_q = torch.log_softmax(perturbed.logits[kept].float(), dim=-1)
    pred = (log_p.exp() * (log_p - log_q)).sum(-1).mean() if kept_any else log_q.sum() * 0.0
    if attn_weight == 0 or clean.attn is None or perturbed.attn is None:
        return pred, torch.zeros((), device=pred.device)
    B, N = kept.shape
    T = clean.attn[0].size(-1)
    L = clean.logits.size(2)
    tok = kept[:, :, None].expand(B, N, L).reshape(B, N * L)
    if T > N * L:  # the hashed user token is always kept
        tok = torch.cat([torch.ones_like(tok[:, : T - N * L]), tok], dim=1)
    pair = (tok[:, :, None] & tok[:, None, :])[:, None]  # [B,1,T,T]
    count = pair.sum() * clean.attn[0].size(1)
    total = torch.zeros((), device=pred.device)
    for a_clean, a_pert in zip(clean.attn, perturbed.attn, strict=True):
        diff = (a_pert.float() - a_clean.float().detach()) * pair
        total = total + diff.pow(2).sum() / count.clamp(min=1)
    return pred, total / len(clean.attn)


def mutual_info_loss(
    model: FAIR,
    history: torch.Tensor,
    target_codes: torch.Tensor,
    target_items: torch.Tensor,
    valid: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """InfoNCE between the history representation at each boundary and its next item.

    history [B,N,D], target_codes [B,N,L], target_items [B,N] item indices, valid [B,N].
    Negatives are the other DISTINCT target items of the batch: a popular item that is the target
    of several boundaries is one class, never its own negative.
    """
    h = F.normalize(model.mi_hist(history[valid]).float(), dim=-1)  # [P,D]
    items, label = torch.unique(target_items[valid], return_inverse=True)  # [U], [P]
    first = torch.zeros_like(items).scatter_(0, label, torch.arange(label.numel(), device=label.device))
    codes = target_codes[valid][first]  # [U,L] codes of each distinct item
    e = F.normalize(model.mi_item(model.item_representation(codes)).float(), dim=-1)  # [U,D]
    return F.cross_entropy(h @ e.T / tau, label)
