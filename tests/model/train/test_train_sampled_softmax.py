"""The sampled softmax with the log-Q correction: same item score as the full softmax, same loss when
every item is a negative, an unbiased-enough estimate of it under a skewed proposal, and its config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY

from model.data.loading import load_dataset
from model.fair import FAIR, FAIRConfig
from model.semantic_ids.table import SemanticIdTable
from model.train.config import ConfigError, TrainConfig, load_config
from model.train.objectives import item_loss
from model.train.sampled_softmax import NegativeSampler, sampled_item_logits, sampled_item_loss
from model.train.trainer import Trainer

torch.set_num_threads(1)
ITEMS, L, V = 300, 3, 16


def _model(text: bool = False) -> FAIR:
    torch.manual_seed(0)
    cfg = FAIRConfig(
        num_levels=L, codebook_size=V, d_model=32, n_layers=1, n_heads=2, dropout=0.0, num_items=ITEMS,
        item_text=text, text_dim=8 if text else 0,
    )  # fmt: skip
    model = FAIR(cfg).eval()
    with torch.no_grad():  # spread the scores, so a wrong column or correction shows
        model.item_emb.weight.normal_(0, 1.0)
        model.item_bias.normal_(0, 1.0)
        if text:
            model.item_text.normal_()
    return model


def _codes(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (ITEMS, L), generator=torch.Generator().manual_seed(seed))


def _history(p: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(p, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("text", [False, True])
def test_sampled_logits_are_the_full_item_scores_at_the_sampled_items(text):
    model, codes, h = _model(text), _codes(), _history()
    with torch.no_grad():
        model.item_trained[::7] = False  # untrained rows score by their codes (and text) alone
    positives = torch.randint(0, ITEMS, (h.size(0),), generator=torch.Generator().manual_seed(2))
    negatives = torch.randint(0, ITEMS, (64,), generator=torch.Generator().manual_seed(3))
    log_expected = torch.linspace(-2.0, 2.0, 64)
    out = sampled_item_logits(model, h, codes, positives, negatives, log_expected)
    full = model.item_logits(h, codes)  # [P, I]
    rows = torch.arange(h.size(0))
    torch.testing.assert_close(out.logits[:, 0], full[rows, positives])
    expected = full[:, negatives] - log_expected
    hit = negatives[None, :] == positives[:, None]
    torch.testing.assert_close(out.logits[:, 1:][~hit], expected[~hit])
    torch.testing.assert_close(out.cand_logits, full[:, out.cand])


def test_accidental_hits_are_masked_and_never_the_positive():
    model, codes, h = _model(), _codes(), _history(4)
    positives = torch.tensor([5, 6, 7, 5])
    negatives = torch.tensor([5, 9, 5, 7])
    out = sampled_item_logits(model, h, codes, positives, negatives, torch.zeros(4))
    assert torch.isfinite(out.logits[:, 0]).all()
    neg_inf = torch.isinf(out.logits[:, 1:])
    assert neg_inf.tolist() == [
        [True, False, True, False],
        [False, False, False, False],
        [False, False, False, True],
        [True, False, True, False],
    ]


def test_all_items_as_negatives_under_a_uniform_proposal_is_the_full_softmax():
    """K = I draws covering each trained item once: log(K Q) = log(I / I) = 0 and the positive's
    accidental hit is masked, so the candidate set is exactly the catalog."""
    model, codes, h = _model(), _codes(), _history()
    trained = np.ones(ITEMS, dtype=bool)
    trained[::11] = False
    sampler = NegativeSampler(np.zeros(ITEMS), trained, "uniform", 0.75, "cpu")
    every = torch.from_numpy(np.flatnonzero(trained))
    positives = every[
        torch.randint(0, every.numel(), (h.size(0),), generator=torch.Generator().manual_seed(4))
    ]
    log_expected = sampler.log_expected_count(every, every.numel())
    torch.testing.assert_close(log_expected, torch.zeros_like(log_expected), atol=1e-6, rtol=0)
    sampled = sampled_item_loss(sampled_item_logits(model, h, codes, positives, every, log_expected).logits)
    full = model.item_logits(h, codes).masked_fill(torch.from_numpy(~trained), float("-inf"))
    torch.testing.assert_close(sampled, item_loss(full, positives), atol=1e-5, rtol=1e-5)


def test_log_q_correction_makes_popularity_sampling_estimate_the_full_loss():
    """Under a skewed proposal the corrected sampled loss averages close to the full loss; without the
    correction it is far off (the correction is what removes the sampler's bias)."""
    model, codes, h = _model(), _codes(), _history()
    counts = np.random.default_rng(0).zipf(1.6, ITEMS).clip(max=5000)
    sampler = NegativeSampler(counts, np.ones(ITEMS, dtype=bool), "popularity", 0.75, "cpu")
    positives = torch.randint(0, ITEMS, (h.size(0),), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = item_loss(model.item_logits(h, codes), positives).item()
        k, gen = 2048, torch.Generator().manual_seed(6)
        corrected, raw = [], []
        for _ in range(20):
            neg = sampler.draw(k, gen)
            corrected.append(sampled_item_loss(
                sampled_item_logits(model, h, codes, positives, neg, sampler.log_expected_count(neg, k)).logits
            ).item())  # fmt: skip
            raw.append(sampled_item_loss(
                sampled_item_logits(model, h, codes, positives, neg, torch.zeros(k)).logits
            ).item())  # fmt: skip
    assert abs(np.mean(corrected) - full) < 0.05 * full, (np.mean(corrected), full)
    assert abs(np.mean(raw) - full) > 0.2 * full, (np.mean(raw), full)


def test_samplers_never_draw_untrained_items_and_follow_their_proposal():
    counts = np.arange(ITEMS)
    trained = counts % 3 != 0
    pop = NegativeSampler(counts, trained, "popularity", 0.5, "cpu")
    uni = NegativeSampler(counts, trained, "uniform", 0.5, "cpu")
    expected = np.where(trained, np.sqrt(counts + 1.0), 0.0)
    np.testing.assert_allclose(pop.q.numpy(), expected / expected.sum(), rtol=1e-5)
    np.testing.assert_allclose(uni.q.numpy(), trained / trained.sum(), rtol=1e-5)
    gen = torch.Generator().manual_seed(0)
    for sampler in (pop, uni):
        drawn = sampler.draw(5000, gen).numpy()
        assert trained[drawn].all()
    # popular items are drawn more often under popularity, not under uniform
    top, low = np.flatnonzero(trained)[-20:], np.flatnonzero(trained)[:20]
    drawn_pop, drawn_uni = pop.draw(20000, gen).numpy(), uni.draw(20000, gen).numpy()
    assert np.isin(drawn_pop, top).sum() > 2 * np.isin(drawn_pop, low).sum()
    assert abs(int(np.isin(drawn_uni, top).sum()) - int(np.isin(drawn_uni, low).sum())) < 300


def test_auto_picks_full_below_the_threshold_and_sampled_from_it():
    t = TrainConfig(sampled_softmax_min_items=200_000)
    assert t.softmax_for(12_101) == "full"
    assert t.softmax_for(199_999) == "full"
    assert t.softmax_for(200_000) == "sampled"
    assert t.softmax_for(1_000_000) == "sampled"
    assert TrainConfig(softmax="full").softmax_for(1_000_000) == "full"
    assert TrainConfig(softmax="sampled").softmax_for(100) == "sampled"
    assert TrainConfig().softmax_for(12_101) == "full"  # the shipped configs' catalogs stay full


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.softmax=partial", "train.softmax must be one of ['auto', 'full', 'sampled']"),
        ("train.negative_sampler=zipf", "train.negative_sampler must be one of ['uniform', 'popularity']"),
        ("train.negative_sampler_alpha=1.5", "train.negative_sampler_alpha must be in [0, 1]"),
        ("train.num_negatives=0", "train.num_negatives must be >= 1"),
        ("train.sampled_softmax_min_items=0", "train.sampled_softmax_min_items must be >= 1"),
        ("train.item_loss=sampled", "train.item_loss is now train.softmax"),
    ],
)
def test_bad_sampled_softmax_settings_are_config_errors(item, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [item])


def test_a_run_saved_with_the_old_item_loss_key_still_loads(tmp_path):
    """Runs written before ``train.softmax`` saved ``train.item_loss``: resume reads it as softmax."""
    saved = load_config(None, ["train.softmax=sampled"]).to_dict()
    saved["train"]["item_loss"] = saved["train"].pop("softmax")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert load_config(tmp_path / "config.json").train.softmax == "sampled"
    assert TrainConfig.from_saved(saved["train"]).softmax == "sampled"


@pytest.mark.parametrize(("min_items", "form"), [(120, "sampled"), (121, "full")])
def test_the_trainer_trains_the_form_auto_picks_for_its_catalog(synth, tmp_path, min_items, form):
    spec, sid = synth  # 120 items
    sets = [*TINY, "train.max_steps=2", "train.eval_every=2", f"train.sampled_softmax_min_items={min_items}",
            "train.num_negatives=16"]  # fmt: skip
    trainer = Trainer(
        load_config(None, sets), load_dataset(spec), SemanticIdTable.load(sid), tmp_path / "r", progress=False
    )
    summary = trainer.fit()
    assert summary["softmax"] == form
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    first = next(r for r in log if r["kind"] == "train")
    # at the start both sit near log(trained items): the log-Q correction puts the sampled loss on the
    # full one's scale (uncorrected, 16 negatives + the positive would start near log 17 = 2.8)
    assert abs(first["next"] - np.log(trainer.trained.sum())) < 0.5, first
