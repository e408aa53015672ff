"""Loss terms and perturbations: each behaves as its definition says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.fair import FAIR, FAIRConfig
from model.train.objectives import item_loss, mutual_info_loss, next_item_loss, robust_loss
from model.train.perturb import perturb_history

torch.set_num_threads(1)
V, L = 16, 3


ITEMS = 50


def _model(attention="focused", num_items=ITEMS):
    torch.manual_seed(0)
    cfg = FAIRConfig(
        num_levels=L, codebook_size=V, d_model=32, n_layers=2, n_heads=2, dropout=0.0, attention=attention,
        num_items=num_items, item_tokens="codes",
    )  # fmt: skip
    return FAIR(cfg).eval()


def _batch(B=4, N=6, seed=0):
    """(codes, items, mask, table): histories of catalog items, left-padded (items -1 on padding)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, V, (ITEMS, L), generator=g)
    items = torch.randint(0, ITEMS, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :2] = False
    items = torch.where(mask, items, torch.full_like(items, -1))
    codes = table[items.clamp(min=0)] * mask[..., None]
    return codes, items, mask, table


def _run(model, codes, items, mask):
    return model(codes, mask, return_attn=True, items=items)


def _kept_logits(model, out, kept, table):
    return model.item_logits(out.history[kept], table)


def test_next_item_loss_is_mean_cross_entropy_over_codes_and_valid_boundaries():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, L, V, generator=g)
    target = torch.randint(0, V, (2, 3, L), generator=g)
    valid = torch.tensor([[False, True, True], [True, True, False]])
    expected = torch.stack([F.cross_entropy(logits[b, n], target[b, n]) for b, n in valid.nonzero()]).mean()
    torch.testing.assert_close(next_item_loss(logits, target, valid), expected)


def test_item_loss_is_softmax_cross_entropy_of_the_target_column():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 9, generator=g)
    labels = torch.tensor([0, 3, 8, 3, 1])
    manual = -(logits.log_softmax(-1)[torch.arange(5), labels]).mean()
    torch.testing.assert_close(item_loss(logits, labels), manual)


def test_identity_perturbation_changes_nothing_and_keeps_every_real_item():
    codes, items, mask, table = _batch()
    p = perturb_history(codes, items, mask, table, mask_code=V, rate=0.0)
    assert torch.equal(p.codes, codes) and torch.equal(p.item_mask, mask) and torch.equal(p.kept, mask)
    assert torch.equal(p.items, items)


@pytest.mark.parametrize("op", ["drop", "mask", "substitute"])
def test_each_perturbation_touches_only_real_items_it_reports_as_not_kept(op):
    codes, items, mask, table = _batch(B=16, N=10)
    p = perturb_history(
        codes, items, mask, table, mask_code=V, rate=0.5, ops=[op], generator=torch.Generator().manual_seed(0)
    )
    touched = mask & ~p.kept
    assert touched.any() and not (p.kept & ~mask).any()
    same = (p.codes == codes).all(-1) & (p.item_mask == mask) & (p.items == items)
    assert same[p.kept].all() and same[~mask].all()  # kept items and padding untouched
    if op == "drop":
        assert not p.item_mask[touched].any() and (p.items[touched] == -1).all()
    if op == "mask":  # some codes hidden, and the identity with them
        assert p.item_mask[touched].all() and (p.codes[touched] == V).any(-1).all()
        assert (p.items[touched] == -1).all()
    if op == "substitute":  # another catalog item: its codes and its index agree
        assert torch.equal(p.codes[touched], table[p.items[touched]])


@pytest.mark.parametrize("attention", ["focused", "standard"])
def test_robust_loss_is_zero_for_identity_perturbation_and_positive_otherwise(attention):
    model = _model(attention)
    codes, items, mask, table = _batch()
    clean = _run(model, codes, items, mask)
    p = perturb_history(codes, items, mask, table, V, rate=0.0)
    pert = _run(model, p.codes, p.items, p.item_mask)
    args = (_kept_logits(model, clean, p.kept, table), _kept_logits(model, pert, p.kept, table))
    pred, attn = robust_loss(*args, clean, pert, p.kept)
    assert pred.item() == pytest.approx(0.0, abs=1e-6) and attn.item() == pytest.approx(0.0, abs=1e-9)
    p = perturb_history(codes, items, mask, table, V, rate=0.5, generator=torch.Generator().manual_seed(0))
    pert = _run(model, p.codes, p.items, p.item_mask)
    args = (_kept_logits(model, clean, p.kept, table), _kept_logits(model, pert, p.kept, table))
    pred, attn = robust_loss(*args, clean, pert, p.kept)
    assert pred.item() > 1e-6 and attn.item() > 1e-9
    # gradients flow into the perturbed pass only (the clean pass is the detached target)
    (pred + attn).backward()
    assert model.code_emb.weight.grad is not None and model.code_emb.weight.grad.abs().sum() > 0


def test_robust_attention_term_counts_one_token_per_item_for_item_token_models():
    torch.manual_seed(0)
    cfg = FAIRConfig(num_levels=L, codebook_size=V, d_model=32, n_layers=2, n_heads=2, dropout=0.0,
                     num_items=ITEMS, item_tokens="item")  # fmt: skip
    model = FAIR(cfg).eval()
    codes, items, mask, table = _batch()
    clean = _run(model, codes, items, mask)
    assert clean.attn[0].shape[-1] == codes.shape[1]  # N tokens
    p = perturb_history(codes, items, mask, table, V, rate=0.0)
    pert = _run(model, p.codes, p.items, p.item_mask)
    args = (_kept_logits(model, clean, p.kept, table), _kept_logits(model, pert, p.kept, table))
    pred, attn = robust_loss(*args, clean, pert, p.kept, tokens_per_item=1)
    assert pred.item() == pytest.approx(0.0, abs=1e-6) and attn.item() == pytest.approx(0.0, abs=1e-9)
    p = perturb_history(codes, items, mask, table, V, rate=0.5, generator=torch.Generator().manual_seed(0))
    pert = _run(model, p.codes, p.items, p.item_mask)
    args = (_kept_logits(model, clean, p.kept, table), _kept_logits(model, pert, p.kept, table))
    pred, attn = robust_loss(*args, clean, pert, p.kept, tokens_per_item=1)
    assert pred.item() > 1e-6 and attn.item() > 1e-9


def test_robust_attention_term_handles_negative_focused_maps():
    model = _model("focused")
    with torch.no_grad():  # sharper maps than at initialisation, so the two maps differ in places
        for block in model.blocks:
            block.attn.qkv.weight.mul_(30.0)
    codes, items, mask, table = _batch()
    clean = _run(model, codes, items, mask)
    assert any((a < 0).any() for a in clean.attn)  # difference maps really are signed
    p = perturb_history(codes, items, mask, table, V, rate=0.5, generator=torch.Generator().manual_seed(2))
    pert = _run(model, p.codes, p.items, p.item_mask)
    args = (_kept_logits(model, clean, p.kept, table), _kept_logits(model, pert, p.kept, table))
    _, attn = robust_loss(*args, clean, pert, p.kept)
    assert torch.isfinite(attn) and attn >= 0


def test_mi_loss_is_infonce_in_the_ranking_space_and_treats_repeated_targets_as_one_class():
    model = _model()
    g = torch.Generator().manual_seed(4)
    table = torch.randint(0, V, (ITEMS, L), generator=g)
    history = torch.randn(4, 32, generator=g)
    targets = torch.tensor([5, 9, 9, 20])  # item 9 is the target twice: one class, not its own negative
    loss = mutual_info_loss(model, history, targets, table)
    # by the definition: cosine of query_vectors / item_vectors of the distinct targets, learned scale
    distinct = torch.tensor([5, 9, 20])
    vec, _ = model.item_vectors(table[distinct], distinct)
    h = F.normalize(model.query_vectors(history), dim=-1)
    e = F.normalize(vec, dim=-1)
    scale = model.mi_log_scale.exp()
    want = F.cross_entropy(scale * h @ e.T, torch.tensor([0, 1, 1, 2]))
    torch.testing.assert_close(loss, want)
    # a history aligned with its target's vector scores far below chance (log 3); misaligned above
    with torch.no_grad():
        model.mi_log_scale.fill_(4.6)
    full_vec, _ = model.item_vectors(table)
    with torch.no_grad():
        basis = model.query_vectors(torch.eye(32))  # [32, Dq]: the linear map history -> query vector
    # histories whose query vectors come as close as a 32-d history can to their targets' vectors
    aligned = torch.linalg.lstsq(basis.T, full_vec[targets].T.detach()).solution.T  # [4, 32]
    good = mutual_info_loss(model, aligned, targets, table)
    bad = mutual_info_loss(model, aligned.roll(1, dims=0), targets, table)
    assert good < 0.5 < 1.0986 < bad  # chance: log(3 distinct targets)
