"""The training objectives: L = L_next + gamma L_code + alpha L_robust + beta L_mi.

L_next is the item-level softmax (``item_loss``) over the score the service ranks by; L_code, the
per-level code cross-entropy of the original multi-token heads (``next_item_loss``), is an optional
auxiliary. All compute in float32 whatever the autocast dtype of the forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.fair import FAIR, FAIROutput


def next_item_loss(logits: torch.Tensor, target_codes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L_code: cross-entropy over the L codes of the next item, averaged over codes and valid boundaries.

    logits [B,N,L,V], target_codes [B,N,L], valid [B,N] (a boundary with a real next item).
    """
    V = logits.size(-1)
    ce = F.cross_entropy(logits[valid].float().reshape(-1, V), target_codes[valid].reshape(-1))
    return ce


def item_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_next: softmax cross-entropy of the next item among the scored items.

    logits [P, C] item scores (``FAIR.item_logits``; the whole catalog, or a sampled candidate set
    already corrected by -log Q), labels [P] the target's column. This trains exactly the score the
    service ranks by.
    """
    return F.cross_entropy(logits.float(), labels)


def robust_loss(
    clean_logits: torch.Tensor,
    pert_logits: torch.Tensor,
    clean: FAIROutput,
    perturbed: FAIROutput,
    kept: torch.Tensor,
    attn_weight: float = 1.0,
    tokens_per_item: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction term, attention term) of L_robust on the item slots both passes keep.

    * predictions: KL(p_clean || p_perturbed) of the next-item distributions (item scores
      ``clean_logits`` / ``pert_logits`` [K, C] at the K kept boundaries), the clean distribution
      detached (the perturbed pass is pulled toward the clean one, never the reverse: the clean pass
      already answers to L_next);
    * attention: mean squared difference of the final attention maps (focused: A1 - lambda A2,
      which can be negative, so no KL) over (query, key) token pairs whose items are both kept,
      averaged over layers and heads; the clean maps detached as well. ``tokens_per_item``: L (the
      default) or 1 for a one-token-per-item network.

    Both are exactly 0 when the perturbation is the identity and the two passes are deterministic.
    """
    log_p = torch.log_softmax(clean_logits.float(), dim=-1).detach()  # [K,C]
    log_q = torch.log_softmax(pert_logits.float(), dim=-1)
    pred = (log_p.exp() * (log_p - log_q)).sum(-1).mean() if log_p.size(0) else log_q.sum() * 0.0
    if tokens_per_item is None:
        tokens_per_item = clean.logits.size(2)  # L tokens per item
    if attn_weight == 0 or clean.attn is None or perturbed.attn is None:
        return pred, torch.zeros((), device=pred.device)
    B, N = kept.shape
    T = clean.attn[0].size(-1)
    P = tokens_per_item
    tok = kept[:, :, None].expand(B, N, P).reshape(B, N * P)
    if T > N * P:  # the hashed user token is always kept
        tok = torch.cat([torch.ones_like(tok[:, : T - N * P]), tok], dim=1)
    pair = (tok[:, :, None] & tok[:, None, :])[:, None]  # [B,1,T,T]
    count = pair.sum() * clean.attn[0].size(1)
    total = torch.zeros((), device=pred.device)
    for a_clean, a_pert in zip(clean.attn, perturbed.attn, strict=True):
        diff = (a_pert.float() - a_clean.float().detach()) * pair
        total = total + diff.pow(2).sum() / count.clamp(min=1)
    return pred, total / len(clean.attn)


def mutual_info_loss(
    model: FAIR, history: torch.Tensor, target_items: torch.Tensor, item_codes: torch.Tensor
) -> torch.Tensor:
    """InfoNCE between the history and its next item, in the space the item score lives in.

    history [P, D] at the valid boundaries, target_items [P], item_codes [I, L] the catalog's codes.
    The history side is ``FAIR.query_vectors`` and the item side ``FAIR.item_vectors``: the same
    vectors whose dot product ranks items, here cosine-normalised with a learned temperature
    (``mi_log_scale``, clamped to [0, log 100]) and with the other distinct targets of the batch as
    negatives. Where the item softmax scores against the whole catalog with unnormalised vectors,
    this term shapes their directions against the hard, in-batch negatives. Chance level is
    log(number of distinct targets).
    """
    items, label = torch.unique(target_items, return_inverse=True)  # [U], [P]
    vec, _ = model.item_vectors(item_codes[items], items)
    h = F.normalize(model.query_vectors(history).float(), dim=-1)  # [P, Dq]
    e = F.normalize(vec.float(), dim=-1)  # [U, Dq]
    scale = model.mi_log_scale.clamp(0.0, 4.6052).exp()
    return F.cross_entropy(scale * (h @ e.T), label)
