"""The folded item table: ``h . table[i] + bias[i]`` is FAIR's item score, for every item (cold items
keep their code and text parts), and the folded code heads give the network's per-level code scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.fold import fold_item_scores
from model.fair import FAIR, FAIRConfig
from model.search.item_scores import ItemScorer
from model.search.modes.registry import make_mode
from model.semantic_ids.trie import CodeTrie

ITEMS, LEVELS, VOCAB, DIM = 60, 3, 8, 16


def _model(item_ids: bool, text: bool, untied: bool = False) -> FAIR:
    torch.manual_seed(0)
    cfg = FAIRConfig(
        num_levels=LEVELS,
        codebook_size=VOCAB,
        d_model=DIM,
        n_layers=1,
        n_heads=2,
        dropout=0.0,
        item_ids=item_ids,
        num_items=ITEMS if item_ids else 0,
        item_text=text,
        text_dim=5 if text else 0,
        tie_output=not untied,
    )
    model = FAIR(cfg).eval()
    with torch.no_grad():
        model.head_bias.normal_()
        if item_ids:
            model.item_bias.normal_()
            model.item_trained[::3] = False  # cold items: no trained ID row
        if text:
            model.item_text.normal_()
    return model


def _codes(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    flat = rng.choice(VOCAB**LEVELS, size=ITEMS, replace=False)
    return np.stack([(flat // VOCAB**i) % VOCAB for i in reversed(range(LEVELS))], axis=1)


@pytest.mark.parametrize(
    "item_ids, text, untied",
    [(True, False, False), (True, True, False), (False, False, False), (True, False, True)],
)
def test_folded_scores_are_the_item_logits(item_ids, text, untied):
    model, codes = _model(item_ids, text, untied), _codes()
    folded = fold_item_scores(model, codes)
    h = torch.randn(7, DIM, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        want = model.item_logits(h, torch.as_tensor(codes)).numpy()
        code_scores = model.head_logits(h).numpy()
    got = folded.all_scores(h.numpy())
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=2e-5 * scale, rtol=1e-5)
    np.testing.assert_allclose(folded.code_part(h.numpy()), code_scores, atol=2e-5 * scale, rtol=1e-5)
    items = np.array([[0, 3, 59, -1], [1, 2, 6, 9]] * 3 + [[5, 5, 0, 1]])
    real = items >= 0
    rows = np.take_along_axis(want, np.maximum(items, 0), axis=1)
    np.testing.assert_allclose(
        folded.scores_of(h.numpy(), items)[real], rows[real], atol=2e-5 * scale, rtol=1e-5
    )
    assert np.isneginf(folded.scores_of(h.numpy(), items)[~real]).all()
    if item_ids:  # cold items still rank: by their codes (and text), not as zero rows
        cold = ~model.item_trained.numpy()
        assert cold.any() and (np.abs(folded.table[cold]).sum(1) > 0).all()


def test_both_modes_rank_the_same_through_the_fold_as_through_the_item_scorer():
    model, codes = _model(True, True), _codes(2)
    folded = fold_item_scores(model, codes)
    with torch.no_grad():
        vectors, bias = model.id_vectors().numpy(), model.id_bias().numpy()
    scorer = ItemScorer(codes, vectors, bias)
    trie = CodeTrie.from_codes(codes, VOCAB)
    h = torch.randn(9, DIM, generator=torch.Generator().manual_seed(3)) * 3
    with torch.no_grad():
        outputs = (model.head_logits(h).numpy(), model.query(h).numpy())
    exclude = [np.arange(i, i + 4) for i in range(9)]
    for mode in (make_mode("exact"), make_mode("beam", {"candidates": 25})):
        want = mode.search(scorer, trie, outputs, 10, exclude)
        got = mode.search(folded, trie, (h.numpy(),), 10, exclude)
        np.testing.assert_array_equal(got.items, want.items)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-4, rtol=1e-5)


def test_a_folded_scorer_refuses_nan_and_a_wrong_width():
    folded = fold_item_scores(_model(True, False), _codes())
    with pytest.raises(ValueError, match="NaN"):
        folded.all_scores(np.full((2, DIM), np.nan, np.float32))
    with pytest.raises(ValueError, match="history must be"):
        folded.all_scores(np.zeros((2, DIM + 1), np.float32))


@pytest.mark.parametrize("text", [False, True])
def test_folding_in_chunks_gives_the_same_table(text):
    """A 1M-item catalog is folded a chunk of items at a time (its float64 item vectors would be ~6 GB):
    chunks that do not divide the catalog give the one-piece fold, bias and cold items included (to
    float64 BLAS's blocking: the rows' sums may be ordered differently, far below float32's step)."""
    model, codes = _model(True, text), _codes(4)
    whole = fold_item_scores(model, codes, chunk=ITEMS)
    scale = np.abs(whole.table).max()
    for chunk in (1, 7, ITEMS - 1):
        part = fold_item_scores(model, codes, chunk=chunk)
        np.testing.assert_allclose(part.table, whole.table, rtol=1e-6, atol=1e-7 * scale)
        np.testing.assert_array_equal(part.bias, whole.bias)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        fold_item_scores(model, codes, chunk=0)
