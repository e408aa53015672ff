"""Loss terms and perturbations: each behaves as its definition says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.fair import FAIR, FAIRConfig
from model.train.objectives import mutual_info_loss, next_item_loss, robust_loss
from model.train.perturb import perturb_history

torch.set_num_threads(1)
V, L = 16, 3


def _model(attention="focused"):
    torch.manual_seed(0)
    cfg = FAIRConfig(
        num_levels=L, codebook_size=V, d_model=32, n_layers=2, n_heads=2, dropout=0.0, attention=attention
    )
    return FAIR(cfg).eval()


def _batch(B=4, N=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, V, (B, N, L), generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :2] = False
    codes = codes * mask[..., None]
    table = torch.randint(0, V, (50, L), generator=g)
    return codes, mask, table


def test_next_item_loss_is_mean_cross_entropy_over_codes_and_valid_boundaries():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, L, V, generator=g)
    target = torch.randint(0, V, (2, 3, L), generator=g)
    valid = torch.tensor([[False, True, True], [True, True, False]])
    expected = torch.stack([F.cross_entropy(logits[b, n], target[b, n]) for b, n in valid.nonzero()]).mean()
    torch.testing.assert_close(next_item_loss(logits, target, valid), expected)


def test_identity_perturbation_changes_nothing_and_keeps_every_real_item():
    codes, mask, table = _batch()
    p = perturb_history(codes, mask, table, mask_code=V, rate=0.0)
    assert torch.equal(p.codes, codes) and torch.equal(p.item_mask, mask) and torch.equal(p.kept, mask)


@pytest.mark.parametrize("op", ["drop", "mask", "substitute"])
def test_each_perturbation_touches_only_real_items_it_reports_as_not_kept(op):
    codes, mask, table = _batch(B=16, N=10)
    p = perturb_history(
        codes, mask, table, mask_code=V, rate=0.5, ops=[op], generator=torch.Generator().manual_seed(0)
    )
    touched = mask & ~p.kept
    assert touched.any() and not (p.kept & ~mask).any()
    same = (p.codes == codes).all(-1) & (p.item_mask == mask)
    assert same[p.kept].all() and same[~mask].all()  # kept items and padding untouched
    if op == "drop":
        assert not p.item_mask[touched].any()
    if op == "mask":
        assert p.item_mask[touched].all() and (p.codes[touched] == V).any(-1).all()
    if op == "substitute":
        rows = p.codes[touched]  # every substituted item is some catalog item
        assert ((rows[:, None, :] == table[None]).all(-1)).any(-1).all()


@pytest.mark.parametrize("attention", ["focused", "standard"])
def test_robust_loss_is_zero_for_identity_perturbation_and_positive_otherwise(attention):
    model = _model(attention)
    codes, mask, table = _batch()
    clean = model(codes, mask, return_attn=True)
    p = perturb_history(codes, mask, table, V, rate=0.0)
    pred, attn = robust_loss(clean, model(p.codes, p.item_mask, return_attn=True), p.kept)
    assert pred.item() == pytest.approx(0.0, abs=1e-7) and attn.item() == pytest.approx(0.0, abs=1e-9)
    p = perturb_history(codes, mask, table, V, rate=0.5, generator=torch.Generator().manual_seed(0))
    pert = model(p.codes, p.item_mask, return_attn=True)
    pred, attn = robust_loss(clean, pert, p.kept)
    assert pred.item() > 1e-6 and attn.item() > 1e-9
    # gradients flow into the perturbed pass only (the clean pass is the detached target)
    (pred + attn).backward()
    assert model.code_emb.weight.grad is not None and model.code_emb.weight.grad.abs().sum() > 0


def test_robust_attention_term_handles_negative_focused_maps():
    model = _model("focused")
    with torch.no_grad():  # sharper maps than at initialisation, so the two maps differ in places
        for block in model.blocks:
            block.attn.qkv.weight.mul_(30.0)
    codes, mask, table = _batch()
    clean = model(codes, mask, return_attn=True)
    assert any((a < 0).any() for a in clean.attn)  # difference maps really are signed
    p = perturb_history(codes, mask, table, V, rate=0.5, generator=torch.Generator().manual_seed(2))
    _, attn = robust_loss(clean, model(p.codes, p.item_mask, return_attn=True), p.kept)
    assert torch.isfinite(attn) and attn >= 0


def test_mi_loss_prefers_aligned_history_and_treats_repeated_targets_as_one_class():
    model = _model()
    N = 4
    items = torch.tensor([[0, 1, 2, 3]])
    target_codes = torch.tensor([[[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]])
    valid = torch.ones(1, N, dtype=torch.bool)
    with torch.no_grad():
        model.mi_hist.weight.copy_(torch.eye(32))
        model.mi_hist.bias.zero_()
        model.mi_item.weight.copy_(torch.eye(32))
        model.mi_item.bias.zero_()
        aligned = model.item_representation(target_codes)  # [1,N,D]: history == its own target
    good = mutual_info_loss(model, aligned, target_codes, items, valid, tau=0.05)
    bad = mutual_info_loss(model, aligned.roll(1, dims=1), target_codes, items, valid, tau=0.05)
    assert good < 0.5 < bad
    # the same target at two boundaries: one class, so the loss is what 3 distinct classes give
    rep_items = torch.tensor([[0, 1, 1, 3]])
    rep_codes = target_codes.clone()
    rep_codes[0, 2] = rep_codes[0, 1]
    hist = model.item_representation(rep_codes)
    loss = mutual_info_loss(model, hist, rep_codes, rep_items, valid, tau=0.05)
    h = F.normalize(hist[0], dim=-1)
    e = F.normalize(model.item_representation(target_codes[0, [0, 1, 3]]), dim=-1)
    torch.testing.assert_close(loss, F.cross_entropy(h @ e.T / 0.05, torch.tensor([0, 1, 1, 2])))
