"""Item scores and the served searches (exact, beam + rescoring) against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from model.search import scoring
from model.search.scoring import ItemScorer, exact_search, search, top_k
from model.semantic_ids.trie import CodeTrie

_ref = scoring.top_k_reference


def _catalog(seed=0, items=300, levels=3, vocab=8, dim=5, with_ids=True):
    rng = np.random.default_rng(seed)
    flat = rng.choice(vocab**levels, size=items, replace=False)
    codes = np.stack([(flat // vocab**i) % vocab for i in reversed(range(levels))], axis=1)
    vectors = rng.standard_normal((items, dim)).astype(np.float32) if with_ids else None
    bias = rng.standard_normal(items).astype(np.float32) if with_ids else None
    return ItemScorer(codes, vectors, bias), CodeTrie.from_codes(codes, vocab), rng


def _outputs(rng, batch=6, levels=3, vocab=8, dim=5):
    cs = rng.standard_normal((batch, levels, vocab)).astype(np.float32) * 2
    return cs, rng.standard_normal((batch, dim)).astype(np.float32)


def _brute(scorer, cs, q):
    out = np.zeros((cs.shape[0], scorer.num_items))
    for b in range(cs.shape[0]):
        for i, c in enumerate(scorer.codes):
            out[b, i] = sum(cs[b, lvl, c[lvl]] for lvl in range(len(c)))
            if scorer.vectors is not None:
                out[b, i] += q[b] @ scorer.vectors[i] + scorer.bias[i]
    return out


@pytest.mark.parametrize("with_ids", [True, False])
def test_scores_are_the_definition(with_ids):
    scorer, _, rng = _catalog(with_ids=with_ids)
    cs, q = _outputs(rng)
    want = _brute(scorer, cs, q)
    np.testing.assert_allclose(scorer.all_scores(cs, q), want, rtol=1e-5, atol=1e-5)
    items = rng.integers(-1, scorer.num_items, (6, 9))
    got = scorer.scores_of(cs, q, items)
    real = items >= 0
    np.testing.assert_allclose(got[real], np.take_along_axis(want, np.maximum(items, 0), 1)[real], rtol=1e-5)
    assert np.isneginf(got[~real]).all()


def test_exact_search_is_brute_force_top_k_without_excluded_items():
    scorer, _, rng = _catalog(seed=1)
    cs, q = _outputs(rng)
    exclude = [rng.choice(300, 20, replace=False) for _ in range(5)] + [None]
    result = exact_search(scorer, cs, q, k=10, exclude=exclude)
    brute = _brute(scorer, cs, q)
    for b in range(6):
        if exclude[b] is not None:
            brute[b, exclude[b]] = -np.inf
        want = np.argsort(-brute[b], kind="stable")[:10]
        assert result.items[b].tolist() == want.tolist()
        np.testing.assert_allclose(result.scores[b], brute[b, want], rtol=1e-5)


def test_beam_with_room_for_every_item_equals_exact_and_narrow_beams_stay_valid():
    scorer, trie, rng = _catalog(seed=2)
    cs, q = _outputs(rng)
    exclude = [rng.choice(300, 30, replace=False) for _ in range(6)]
    exact = search(scorer, trie, cs, q, 10, "exact", exclude=exclude)
    wide = search(scorer, trie, cs, q, 10, "beam", candidates=300, exclude=exclude)
    assert (wide.items == exact.items).all()
    narrow = search(scorer, trie, cs, q, 10, "beam", candidates=12, exclude=exclude)
    for b in range(6):  # valid, distinct, not excluded, and ordered by the full score
        got = narrow.items[b]
        assert len(set(got.tolist())) == 10 and not np.isin(got, exclude[b]).any()
        assert (np.diff(narrow.scores[b]) <= 0).all()


def test_fewer_items_than_k_are_padded_and_bad_input_is_refused():
    scorer, trie, rng = _catalog(items=12, seed=3)
    cs, q = _outputs(rng, batch=2)
    result = search(scorer, trie, cs, q, 15, "exact", exclude=[np.arange(5), None])
    assert (result.items[0, 7:] == -1).all() and np.isneginf(result.scores[0, 7:]).all()
    assert (result.items[1, :12] >= 0).all() and (result.items[1, 12:] == -1).all()
    with pytest.raises(ValueError, match="search mode"):
        search(scorer, trie, cs, q, 5, "greedy")
    with pytest.raises(ValueError, match="NaN"):
        scorer.all_scores(np.full_like(cs, np.nan), q)
    with pytest.raises(ValueError, match="query width"):
        scorer.all_scores(cs, q[:, :3])
    with pytest.raises(ValueError, match="outside the catalog"):
        exact_search(scorer, cs, q, 5, exclude=[np.array([12]), None])
    with pytest.raises(ValueError, match="candidates"):
        search(scorer, trie, cs, q, 10, "beam", candidates=5)
    assert top_k(np.array([[1.0, 3.0, 3.0]]), 2).items.tolist() == [[1, 2]]  # ties: lower column first


@pytest.mark.parametrize("width", [3001, 7680, 12101])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_top_k_matches_the_reference(width, dtype, monkeypatch):
    """top_k pre-selects blocks of columns; it must pick what one selection over the row picks,
    also with excluded items, NaN, rows with fewer than k finite scores and ties."""
    rng = np.random.default_rng(width)
    scores = rng.standard_normal((8, width)).astype(dtype)
    scores[0, rng.choice(width, width // 2, replace=False)] = -np.inf
    scores[1, :] = -np.inf
    scores[1, [5, width - 1, 700]] = [1.0, 2.0, 1.0]  # three candidates, a tie between two of them
    scores[2, [3, 900, width - 2]] = 50.0  # a three-way tie at the top, across blocks
    scores[3] = np.round(scores[3] * 2) / 2  # many ties everywhere
    scores[4, : width // 2] = np.nan  # NaN is never a candidate, whole NaN blocks included
    widths = []  # the rows top_k_reference ranks: a fast top_k hands it k blocks, not the row
    monkeypatch.setattr(scoring, "top_k_reference", lambda x, k: widths.append(x.shape[1]) or _ref(x, k))
    # which of equal scores fills the k-th place is arbitrary in both forms (row 3 everywhere, rows 1
    # and 2 for k < 3); ties inside the top k go to the lower column
    for k in (3, 10, 25):
        if -(-width // scoring.TOP_K_BLOCK) <= 2 * k:
            continue
        widths.clear()
        fast, ref = scoring.top_k(scores, k), _ref(scores, k)
        assert widths == [k * scoring.TOP_K_BLOCK]
        rows = [0, 1, 2, 4, 5, 6, 7]
        np.testing.assert_array_equal(fast.items[rows], ref.items[rows])
        np.testing.assert_array_equal(fast.scores, ref.scores)
        assert not np.isnan(fast.scores).any() and (fast.items[4] >= width // 2).all()
    assert scoring.top_k(scores, 3).items[1].tolist() == [width - 1, 5, 700]
    assert scoring.top_k(scores, 3).items[2].tolist() == [3, 900, width - 2]
    empty = scoring.top_k(scores[:0], 3)
    assert empty.items.shape == (0, 3) and empty.scores.shape == (0, 3)
