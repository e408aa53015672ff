"""The sampled item softmax: L_next over the positive and a few sampled negatives, log-Q corrected.

The full softmax scores every catalog item at every boundary: a ``[P, I]`` product, softmax and
gradient per step, which does not fit a 1M-item catalog on a small machine. The sampled form scores the
positive and ``K`` negatives drawn from a proposal ``Q`` (shared by all rows of the batch) and corrects
each negative's logit by ``-log(K Q(j))``, the log of its expected count among the draws:

    loss_p = -s(p, pos_p) + log( exp s(p, pos_p) + sum_k exp(s(p, j_k) - log(K Q(j_k))) )

``sum_k exp(s_k) / (K Q(j_k))`` is an unbiased estimate of ``sum_j exp(s_j)`` over the catalog, so the
loss estimates the full softmax's (Yi et al. 2019; Bengio & Senecal's importance sampling); without the
correction a popularity proposal would push popular items down twice (once by being drawn often, once
by their logit). A negative equal to the row's positive (an accidental hit) is masked out, so the
positive never competes with itself. Draws are with replacement: a duplicate is two samples of the
same estimate, which the expected count accounts for.

The scores come from ``FAIR.item_logits`` on the distinct items of the batch (positives and negatives),
then are gathered: the same item score as the full softmax and the service, no second score path.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from model.fair import FAIR


class NegativeSampler:
    """Proposal ``Q`` over the catalog: ``uniform`` over the trained items, or ``popularity``
    ``(count + 1) ** alpha`` over them. Items without a training interaction have ``Q = 0``: they are
    never a negative (the full softmax masks them too), so their codes are not pushed down for being
    absent and a cold item can still be recommended."""

    def __init__(self, counts: np.ndarray, trained: np.ndarray, kind: str, alpha: float, device: str) -> None:
        if kind == "uniform":
            weight = trained.astype(np.float64)
        elif kind == "popularity":
            weight = np.where(trained, (counts.astype(np.float64) + 1.0) ** alpha, 0.0)
        else:
            raise ValueError(f"unknown negative sampler {kind!r} (uniform | popularity)")
        if weight.sum() <= 0:
            raise ValueError("no trained item to draw negatives from")
        self.kind = kind
        self.q = torch.from_numpy(weight / weight.sum()).float().to(device)  # [I], sums to 1

    def draw(self, k: int, gen: torch.Generator) -> torch.Tensor:
        """``k`` item indices drawn with replacement from ``Q`` (one set shared by the batch)."""
        return torch.multinomial(self.q, k, True, generator=gen)

    def log_expected_count(self, items: torch.Tensor, k: int) -> torch.Tensor:
        """``log(k Q(i))``: how often item ``i`` is expected among ``k`` draws, in log."""
        return torch.log(self.q[items] * k)


class SampledLogits(NamedTuple):
    logits: torch.Tensor  # [P, 1 + K]: column 0 the positive, then the corrected negatives (hits -inf)
    cand: torch.Tensor  # [C] the distinct items scored (positives and negatives)
    cand_logits: torch.Tensor  # [P, C] their uncorrected item scores (what L_robust compares)


def sampled_item_logits(
    model: FAIR,
    history: torch.Tensor,
    item_codes: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    log_expected: torch.Tensor,
) -> SampledLogits:
    """The sampled softmax's logits. history [P, D] at the boundaries, item_codes [I, L] the catalog's
    codes, positives [P] each row's next item, negatives [K] shared by the rows, log_expected [K] their
    ``log(K Q)``. The label of every row is column 0 (``sampled_item_loss``)."""
    cand, inverse = torch.unique(torch.cat([positives, negatives]), return_inverse=True)
    cand_logits = model.item_logits(history, item_codes[cand], cand)  # [P, C]: THE item score
    pos_col, neg_col = inverse[: positives.numel()], inverse[positives.numel() :]
    pos = cand_logits.gather(1, pos_col[:, None])  # [P, 1]
    neg = cand_logits[:, neg_col] - log_expected.to(cand_logits.dtype)  # [P, K]
    neg = neg.masked_fill(negatives[None, :] == positives[:, None], float("-inf"))  # accidental hits
    return SampledLogits(torch.cat([pos, neg], dim=1), cand, cand_logits)


def sampled_item_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the positive in column 0 of ``sampled_item_logits``' logits, in float32."""
    labels = torch.zeros(logits.size(0), dtype=torch.long, device=logits.device)
    return torch.nn.functional.cross_entropy(logits.float(), labels)
