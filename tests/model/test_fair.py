"""The FAIR network: focused attention vs its reference, reduction to standard attention, padding."""

from __future__ import annotations

import math

import pytest
import torch

from model.fair import (
    FAIR,
    FAIRConfig,
    focused_attention_fast,
    focused_attention_reference,
    lambda_init_for_layer,
    reference_attention,
)

torch.set_num_threads(1)


def _qkv(B=2, H=2, T=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q1, k1, q2, k2 = (torch.randn(B, H, T, d, generator=g) for _ in range(4))
    v = torch.randn(B, H, T, 2 * d, generator=g)
    return q1, k1, q2, k2, v


def _allowed(B=2, T=6, padded=2):
    """Causal, with the first ``padded`` keys of batch row 0 masked (left padding)."""
    key_real = torch.ones(B, T, dtype=torch.bool)
    key_real[0, :padded] = False
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return (causal[None] & key_real[:, None, :])[:, None]


def _manual_softmax_attention(q, k, v, allowed):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)
    return probs @ v


def test_reference_attention_matches_textbook_softmax_and_zeroes_fully_masked_rows():
    q1, k1, _, _, v = _qkv()
    allowed = _allowed()
    out, probs = reference_attention(q1, k1, v, allowed)
    torch.testing.assert_close(out, _manual_softmax_attention(q1, k1, v, allowed))
    # row 0's queries 0 and 1 see only padded keys: all-zero attention and output, no NaN
    assert torch.equal(probs[0, :, :2], torch.zeros_like(probs[0, :, :2]))
    assert torch.equal(out[0, :, :2], torch.zeros_like(out[0, :, :2]))
    torch.testing.assert_close(probs[1].sum(-1), torch.ones(2, 6))


@pytest.mark.parametrize("lam", [0.0, 0.35, 1.2])
def test_fast_focused_attention_equals_reference(lam):
    q1, k1, q2, k2, v = _qkv(seed=3)
    allowed = _allowed()
    lam_t = torch.tensor(lam)
    ref, diff = focused_attention_reference(q1, k1, q2, k2, v, lam_t, allowed)
    fast = focused_attention_fast(q1, k1, q2, k2, v, lam_t, allowed)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    # the definition: softmax1 - lambda softmax2
    p1 = reference_attention(q1, k1, v, allowed)[1]
    p2 = reference_attention(q2, k2, v, allowed)[1]
    torch.testing.assert_close(diff, p1 - lam * p2)


def test_focused_attention_reduces_to_standard_when_second_map_vanishes():
    q1, k1, q2, k2, v = _qkv(seed=5)
    allowed = _allowed()
    standard, probs = reference_attention(q1, k1, v, allowed)
    focused, diff = focused_attention_reference(q1, k1, q2, k2, v, torch.tensor(0.0), allowed)
    torch.testing.assert_close(focused, standard)
    torch.testing.assert_close(diff, probs)
    # two identical maps with lambda = 1 cancel exactly (the common-mode noise the design removes)
    cancelled, _ = focused_attention_reference(q1, k1, q1, k1, v, torch.tensor(1.0), allowed)
    assert cancelled.abs().max() < 1e-6


def test_fast_attention_has_no_nan_gradients_on_fully_padded_rows():
    q1, k1, q2, k2, v = (t.requires_grad_() for t in _qkv(seed=7))
    allowed = _allowed(padded=6)  # batch row 0 is all padding
    out = focused_attention_fast(q1, k1, q2, k2, v, torch.tensor(0.5), allowed)
    out.sum().backward()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    for t in (q1, k1, q2, k2, v):
        assert torch.isfinite(t.grad).all()


def test_lambda_init_schedule_follows_differential_transformer():
    assert lambda_init_for_layer(1) == pytest.approx(0.2)
    assert lambda_init_for_layer(2) == pytest.approx(0.8 - 0.6 * math.exp(-0.3))
    assert lambda_init_for_layer(30) == pytest.approx(0.8, abs=1e-3)


def _inputs(B=3, N=5, L=4, V=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, V, (B, N, L), generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :3] = False  # a short history, left-padded
    mask[1] = False  # an empty history
    return codes * mask[..., None], mask


@pytest.mark.parametrize("attention", ["focused", "standard"])
def test_model_fast_and_plain_paths_agree_and_outputs_have_contract_shapes(attention):
    torch.manual_seed(0)
    cfg = FAIRConfig(
        codebook_size=16,
        d_model=32,
        n_layers=2,
        n_heads=2,
        dropout=0.0,
        attention=attention,
        item_tokens="codes",
    )
    model = FAIR(cfg).eval()
    codes, mask = _inputs()
    fast = model(codes, mask)
    plain = model(codes, mask, return_attn=True)
    assert fast.logits.shape == (3, 5, 4, 16) and fast.history.shape == (3, 5, 32)
    assert len(plain.attn) == 2 and plain.attn[0].shape == (3, 2, 20, 20)
    torch.testing.assert_close(fast.logits, plain.logits, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(fast.logits).all()
    code_scores, query = model.next_item_scores(codes, _items(mask), mask)
    assert code_scores.shape == (3, 4, 16) and code_scores.dtype == torch.float32
    assert query.shape == (3, 32) and query.dtype == torch.float32
    torch.testing.assert_close(code_scores, plain.logits[:, -1])
    # the exported path runs the heads at the newest boundary only: same numbers as all boundaries
    last = model(codes, mask, plain=True, last_only=True)
    assert last.logits.shape == (3, 1, 4, 16) and last.history.shape == (3, 1, 32)
    torch.testing.assert_close(last.logits, plain.logits[:, -1:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(query, model.query(plain.history[:, -1]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("item_tokens", ["item", "codes"])
@pytest.mark.parametrize("user_buckets", [0, 5])
def test_the_served_forward_at_the_newest_item_equals_the_full_forward(item_tokens, user_buckets):
    """next_item_scores runs the last block for the newest position only: the same numbers as the
    full forward read at its last boundary, with one or L tokens per item and with a user token."""
    torch.manual_seed(0)
    cfg = FAIRConfig(codebook_size=16, d_model=32, n_layers=3, n_heads=2, dropout=0.0, num_items=40,
                     item_tokens=item_tokens, user_buckets=user_buckets)  # fmt: skip
    model = FAIR(cfg).eval()
    codes, mask = _inputs()
    items = _items(mask)
    users = torch.tensor([1, 2, 3]) if user_buckets else None
    full = model(codes, mask, plain=True, items=items, user_buckets=users)
    code_scores, query = model.next_item_scores(codes, items, mask, user_buckets=users)
    torch.testing.assert_close(code_scores, full.logits[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(query, model.query(full.history[:, -1]), atol=1e-5, rtol=1e-5)


def _items(mask: torch.Tensor, num_items: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, num_items, mask.shape, generator=g)
    return torch.where(mask, items, torch.full_like(items, -1))


def _id_model(seed: int = 0, num_items: int = 40) -> FAIR:
    torch.manual_seed(seed)
    cfg = FAIRConfig(codebook_size=16, d_model=32, n_layers=2, n_heads=2, dropout=0.0, num_items=num_items)
    return FAIR(cfg).eval()


@pytest.mark.parametrize("item_ids, item_tokens", [(True, "codes"), (False, "codes"), (True, "item")])
def test_left_padding_does_not_change_the_prediction(item_ids, item_tokens):
    torch.manual_seed(0)
    cfg = FAIRConfig(codebook_size=16, d_model=32, n_layers=2, n_heads=2, dropout=0.0, item_tokens=item_tokens,
                     num_items=40 if item_ids else 0)  # fmt: skip
    model = FAIR(cfg).eval()
    codes, mask = _inputs()
    items = _items(mask)
    short = model.next_item_scores(codes[:1, 3:], items[:1, 3:], mask[:1, 3:])  # without the padding
    padded = model.next_item_scores(codes[:1], items[:1], mask[:1])
    for a, b in zip(short, padded, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_item_logits_are_code_scores_plus_the_id_part_item_by_item():
    """The one-matmul form of the item score equals its definition: sum over levels of the code
    scores of the item's codes + query . id_vector + id_bias (reference form, item by item)."""
    model = _id_model()
    with torch.no_grad():
        model.item_bias.normal_()
        model.head_bias.normal_()
    g = torch.Generator().manual_seed(2)
    table = torch.randint(0, 16, (40, 4), generator=g)
    history = torch.randn(5, 32, generator=g)
    with torch.no_grad():
        fast = model.item_logits(history, table)
        code = model.head_logits(history)  # [5, L, V]
        q = model.query(history)
        for i in range(40):
            want = sum(code[:, lvl, table[i, lvl]] for lvl in range(4))
            want = want + q @ model.item_emb.weight[i] + model.item_bias[i]
            torch.testing.assert_close(fast[:, i], want, atol=1e-4, rtol=1e-4)
        subset = torch.tensor([3, 17, 5])
        torch.testing.assert_close(model.item_logits(history, table[subset], subset), fast[:, subset])


@pytest.mark.parametrize("num_items", [40, 0])
def test_folded_item_logits_equal_the_reference_form_in_value_and_gradient(num_items):
    """The folded product (h against the items' vectors folded through query_vectors' matrix, what
    training uses for ~1,000 boundaries x thousands of candidates) equals the reference stacked
    product: the same scores and the same gradients for every parameter and for the history."""
    torch.manual_seed(3)
    cfg = FAIRConfig(codebook_size=16, d_model=32, n_layers=2, n_heads=2, dropout=0.0, num_items=num_items)
    model = FAIR(cfg)
    with torch.no_grad():
        model.head_bias.normal_()
        if num_items:
            model.item_bias.normal_()
    g = torch.Generator().manual_seed(4)
    table = torch.randint(0, 16, (40, 4), generator=g)
    items = torch.arange(40) if num_items else None
    history = torch.randn(300, 32, generator=g)
    weights = torch.randn(300, 40, generator=g)  # a loss that weighs every score differently
    grads = []
    for folded in (False, True):
        model.zero_grad()
        h = history.clone().requires_grad_()
        scores = model.item_logits(h, table, items, folded=folded)
        (scores * weights).sum().backward()
        named = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        grads.append((scores.detach(), h.grad.clone(), named))
    (ref, ref_h, ref_p), (fold, fold_h, fold_p) = grads
    torch.testing.assert_close(fold, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fold_h, ref_h, atol=1e-4, rtol=1e-4)
    assert fold_p.keys() == ref_p.keys() and "head_proj" in ref_p
    for name in ref_p:
        torch.testing.assert_close(fold_p[name], ref_p[name], atol=1e-3, rtol=1e-4, msg=name)
    # the automatic choice: folded for many rows (300 > D), the reference form for a few
    with torch.no_grad():
        torch.testing.assert_close(model.item_logits(history, table, items), fold)
        torch.testing.assert_close(model.item_logits(history[:4], table, items), ref[:4])


def _scores_with_item_and_as_unknown(model: FAIR, item: int):
    """(items, scores with ``item`` as the newest item of user 2, scores with it replaced by -1)."""
    codes, mask = _inputs()
    items = _items(mask)
    items[2, -1] = item
    unknown = items.clone()
    unknown[2, -1] = -1
    return items, model.next_item_scores(codes, items, mask), model.next_item_scores(codes, unknown, mask)


def test_untrained_items_have_no_id_part_in_input_or_score():
    model = _id_model()
    with torch.no_grad():
        model.item_bias.normal_()
        model.item_trained[7] = False
    g = torch.Generator().manual_seed(3)
    table = torch.randint(0, 16, (40, 4), generator=g)
    history = torch.randn(4, 32, generator=g)
    with torch.no_grad():
        full = model.item_logits(history, table)
        code_only = model.head_logits(history)[:, torch.arange(4), table[7]].sum(-1)
        torch.testing.assert_close(full[:, 7], code_only, atol=1e-5, rtol=1e-5)
        # as an input, an untrained item is the same as an unknown one (-1): codes only
        items, a, b = _scores_with_item_and_as_unknown(model, 7)
        torch.testing.assert_close(a[0], b[0])


def test_one_token_per_item_is_the_sum_of_its_code_embeddings():
    """item_tokens = "item": T = N tokens, each the item's code embeddings summed (+ position + ID); the
    fast and plain attention forms agree and the maps are [B, H, N, N]."""
    torch.manual_seed(0)
    cfg = FAIRConfig(codebook_size=16, d_model=32, n_layers=2, n_heads=2, dropout=0.0, item_tokens="item")
    model = FAIR(cfg).eval()
    codes, mask = _inputs()
    fast, plain = model(codes, mask), model(codes, mask, return_attn=True)
    assert plain.attn[0].shape == (3, 2, 5, 5) and fast.logits.shape == (3, 5, 4, 16)
    torch.testing.assert_close(fast.logits, plain.logits, atol=1e-5, rtol=1e-5)
    # permuting an item's codes across levels changes the item: levels keep separate tables
    swapped = codes.clone()
    swapped[2, -1] = codes[2, -1].flip(0)
    if not torch.equal(swapped, codes):
        assert not torch.allclose(model(swapped, mask).logits[2, -1], fast.logits[2, -1])
    with pytest.raises(ValueError, match="item_tokens"):
        FAIRConfig(item_tokens="words")


def test_id_dropout_leaves_whole_id_vectors_out_in_training_only():
    """model.id_dropout: in training a drawn share of history items enters by its codes alone (as an
    unknown item would); in eval mode (export, serving) every known item keeps its ID embedding."""
    torch.manual_seed(0)
    cfg = FAIRConfig(codebook_size=16, d_model=32, n_layers=2, n_heads=2, dropout=0.0, num_items=40,
                     id_dropout=0.5)  # fmt: skip
    model = FAIR(cfg).train()
    codes, mask = _inputs()
    items = _items(mask)
    torch.manual_seed(5)
    dropped_out = model(codes, mask, items=items).logits
    torch.manual_seed(5)
    keep = torch.rand(*items.shape) >= 0.5  # the same draw as the forward pass
    assert keep[mask].any() and (~keep[mask]).any()
    model.eval()
    as_unknown = model(codes, mask, items=torch.where(keep, items, -1)).logits
    torch.testing.assert_close(dropped_out, as_unknown, atol=1e-5, rtol=1e-5)
    full = model(codes, mask, items=items).logits
    assert not torch.allclose(full[mask], as_unknown[mask])
    torch.testing.assert_close(full, model(codes, mask, items=items).logits)  # eval: deterministic
    with pytest.raises(ValueError, match="id_dropout"):
        FAIRConfig(id_dropout=1.0)


def test_item_text_joins_the_id_part_of_every_known_item_on_input_and_output():
    """model.item_text: ID row (trained items only) + projected text (every item) on both sides."""
    torch.manual_seed(0)
    cfg = FAIRConfig(codebook_size=16, d_model=32, n_layers=2, n_heads=2, dropout=0.0, num_items=40,
                     item_text=True, text_dim=6)  # fmt: skip
    model = FAIR(cfg).eval()
    with torch.no_grad():
        model.item_text.normal_()
        model.item_trained[7] = False
        text = model.text_proj(model.item_text)  # [I, D]
        vec = model.id_vectors()
        torch.testing.assert_close(vec[7], text[7])  # cold: the text part alone
        torch.testing.assert_close(vec[3], model.item_emb.weight[3] + text[3])
        items, a, b = _scores_with_item_and_as_unknown(model, 7)
        assert not torch.allclose(a[1][2], b[1][2])  # a cold item is not an unknown one: it has text
        torch.testing.assert_close(model.id_input(items)[2, -1], text[7])
    with pytest.raises(ValueError, match="item_ids"):
        FAIRConfig(item_text=True, item_ids=False, text_dim=6)
    assert FAIR(FAIRConfig(num_items=40, item_text=True)).text_proj is None  # no width: no text part
    # a network without text keeps the state dict it had before item_text existed (old checkpoints load)
    assert not any("text" in k for k in FAIR(FAIRConfig(num_items=40)).state_dict())


@pytest.mark.parametrize("item_tokens, item_text", [("item", False), ("codes", False), ("item", True)])
def test_gathered_id_inputs_give_what_the_items_give(item_tokens, item_text):
    """The exported graph's input (bundle schema 4): in eval mode ``id_input(items)`` is row by row
    ``id_vectors()[items]`` for known items and 0 for unknown/padding, so ``forward`` with those rows as
    ``id_inputs`` equals ``forward`` with the item indices (cold items and their text part included)."""
    torch.manual_seed(0)
    cfg = FAIRConfig(codebook_size=16, d_model=32, n_layers=2, n_heads=2, dropout=0.0, num_items=40,
                     item_tokens=item_tokens, item_text=item_text, text_dim=6 if item_text else 0)  # fmt: skip
    model = FAIR(cfg).eval()
    with torch.no_grad():
        model.item_trained[::3] = False
        if item_text:
            model.item_text.normal_()
        codes, mask = _inputs()
        items = _items(mask)
        items[2, 1] = -1  # an unknown item inside a real history
        rows = model.id_vectors()[items.clamp(min=0)] * (items >= 0)[..., None]  # [B,N,D]
        torch.testing.assert_close(model.id_input(items), rows)
        want = model(codes, mask, items=items, plain=True, last_only=True)
        got = model(codes, mask, id_inputs=rows, plain=True, last_only=True)
        torch.testing.assert_close(got.history, want.history, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)


def test_item_id_model_needs_items():
    model = _id_model()
    codes, mask = _inputs()
    with pytest.raises(ValueError, match="items"):
        model(codes, mask)


def test_focused_model_reduces_to_standard_layer_when_lambda_is_zero():
    """With lambda = 0 a focused layer is standard attention over the first Q/K halves (+ its norm)."""
    torch.manual_seed(0)
    cfg = FAIRConfig(codebook_size=16, d_model=32, n_layers=1, n_heads=2, dropout=0.0)
    attn = FAIR(cfg).blocks[0].attn
    with torch.no_grad():  # exp(q1.k1) - exp(q2.k2) = -lambda_init  ->  lambda = 0
        attn.lambda_q2.zero_()
        attn.lambda_k2.zero_()
        attn.lambda_q1.fill_(0.0)
        attn.lambda_q1[0] = 1.0
        attn.lambda_k1.fill_(0.0)
        attn.lambda_k1[0] = math.log(1.0 - attn.lambda_init)
    assert attn.lam().item() == pytest.approx(0.0, abs=1e-6)
    x = torch.randn(2, 6, 32)
    allowed = _allowed()
    y, maps = attn(x, allowed, plain=True, return_attn=True)
    q, k, v = attn.qkv(x).split(32, dim=-1)
    q1 = q.view(2, 6, 2, 2, 8)[:, :, :, 0].transpose(1, 2)
    k1 = k.view(2, 6, 2, 2, 8)[:, :, :, 0].transpose(1, 2)
    vv = v.view(2, 6, 2, 16).transpose(1, 2)
    std, probs = reference_attention(q1, k1, vv, allowed)
    expected = attn.proj((attn.head_norm(std) * (1 - attn.lambda_init)).transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps, probs, atol=1e-6, rtol=1e-5)


def test_focused_and_standard_networks_have_the_same_size():
    sizes = {a: FAIR(FAIRConfig(attention=a)).num_params() for a in ("focused", "standard")}
    assert abs(sizes["focused"] - sizes["standard"]) < 0.01 * sizes["standard"]
    assert 500_000 < sizes["focused"] < 2_500_000


def test_user_token_model_needs_user_buckets():
    model = FAIR(FAIRConfig(codebook_size=16, d_model=32, n_layers=1, n_heads=2, user_buckets=7)).eval()
    codes, mask = _inputs()
    with pytest.raises(ValueError, match="user_buckets"):
        model(codes, mask)
    out = model(codes, mask, user_buckets=torch.tensor([0, 3, 6]))
    assert out.logits.shape == (3, 5, 4, 16) and torch.isfinite(out.logits).all()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="attention"):
        FAIRConfig(attention="sparse")
    with pytest.raises(ValueError, match="divisible"):
        FAIRConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown"):
        FAIRConfig.from_dict({"d_model": 32, "width": 3})


def test_configs_saved_before_item_ids_and_item_tokens_load_as_the_form_they_had():
    """A checkpoint's model_config from before these keys existed must not pick up today's defaults
    (one token per item, item IDs): its weights were trained as L code tokens without item IDs."""
    old = {
        k: v
        for k, v in FAIRConfig(codebook_size=16).to_dict().items()
        if k not in ("item_tokens", "item_ids")
    }
    cfg = FAIRConfig.from_dict(old)
    assert cfg.item_tokens == "codes" and not cfg.item_ids
    assert FAIRConfig().item_tokens == "item" and FAIRConfig().item_ids
