"""Constrained beam search and exact top-k, checked against a brute-force score of every catalog item."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.search.beam import SearchResult, constrained_beam_search, exact_topk
from model.semantic_ids.trie import CodeTrie


def make_case(seed: int, num_items: int, length: int, vocab: int, batch: int, n_excl: int, neg_inf: bool):
    """A random catalog of unique code tuples, log-probs [B, L, V] and per-user exclusion lists."""
    rng = np.random.default_rng(seed)
    keys = rng.permutation(vocab**length)[: min(num_items, vocab**length)]
    codes = np.stack(np.unravel_index(keys, (vocab,) * length), axis=1).reshape(len(keys), length)
    log_probs = np.log(rng.dirichlet(np.full(vocab, 0.5), size=(batch, length))).astype(np.float32)
    if neg_inf:  # a model may rule codes out entirely; those items still exist, scored -inf
        log_probs[rng.random(log_probs.shape) < 0.2] = -np.inf
    exclude = [rng.choice(len(codes), size=min(n_excl, len(codes)), replace=False) for _ in range(batch)]
    return codes, log_probs, exclude


def brute_force(log_probs: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """[B, N] float64 score of every item: sum over levels of log_probs[b, l, codes[i, l]]."""
    lp = log_probs.astype(np.float64)
    total = np.zeros((lp.shape[0], len(codes)))
    for level in range(codes.shape[1]):
        total = total + lp[:, level, codes[:, level]]
    return total


def expected_scores(brute_row: np.ndarray, excluded: np.ndarray, k: int) -> np.ndarray:
    allowed = np.delete(brute_row, excluded)
    best = np.sort(allowed)[::-1][:k]
    return np.concatenate([best, np.full(k - len(best), -np.inf)]).astype(np.float32)


def check_valid(result: SearchResult, brute: np.ndarray, exclude, k: int) -> None:
    """Valid, distinct, non-excluded, best first, exact scores, -1/-inf padding only at the end."""
    assert result.items.shape == result.scores.shape == (brute.shape[0], k)
    assert result.items.dtype == np.int64 and result.scores.dtype == np.float32
    for b, (items, scores) in enumerate(zip(result.items, result.scores, strict=True)):
        available = brute.shape[1] - len(exclude[b])
        real = items >= 0
        n = int(real.sum())
        assert n == min(k, available), "k items must come back whenever the catalog has them"
        assert real[:n].all() and not real[n:].any() and np.all(scores[n:] == -np.inf)
        assert len(set(items[:n].tolist())) == n
        assert not set(items[:n].tolist()) & set(np.asarray(exclude[b]).tolist())
        assert np.array_equal(scores[:n], brute[b, items[:n]].astype(np.float32))
        assert np.all(scores[: max(n - 1, 0)] >= scores[1:n])  # best first (-inf >= -inf holds)


case_strategy = {
    "seed": st.integers(0, 2**31),
    "num_items": st.integers(0, 60),
    "length": st.integers(1, 4),
    "vocab": st.integers(1, 5),
    "batch": st.integers(1, 4),
    "n_excl": st.integers(0, 8),
    "k": st.integers(1, 12),
    "neg_inf": st.booleans(),
}


@settings(max_examples=80, deadline=None)
@given(**case_strategy)
def test_exact_topk_equals_brute_force(seed, num_items, length, vocab, batch, n_excl, k, neg_inf):
    codes, lp, exclude = make_case(seed, num_items, length, vocab, batch, n_excl, neg_inf)
    trie = CodeTrie.from_codes(codes, vocab)
    brute = brute_force(lp, codes)
    result = exact_topk(lp, trie, k, exclude)
    check_valid(result, brute, exclude, k)
    for b in range(batch):
        assert np.array_equal(result.scores[b], expected_scores(brute[b], exclude[b], k))


@settings(max_examples=80, deadline=None)
@given(beam=st.integers(1, 6), **case_strategy)
def test_beam_returns_valid_distinct_unexcluded_sorted_items(
    seed, num_items, length, vocab, batch, n_excl, k, neg_inf, beam
):
    codes, lp, exclude = make_case(seed, num_items, length, vocab, batch, n_excl, neg_inf)
    trie = CodeTrie.from_codes(codes, vocab)
    check_valid(constrained_beam_search(lp, trie, beam, k, exclude), brute_force(lp, codes), exclude, k)


@settings(max_examples=40, deadline=None)
@given(**case_strategy)
def test_beam_wider_than_every_level_is_exact(seed, num_items, length, vocab, batch, n_excl, k, neg_inf):
    codes, lp, exclude = make_case(seed, num_items, length, vocab, batch, n_excl, neg_inf)
    trie = CodeTrie.from_codes(codes, vocab)
    widest = max(trie.num_nodes(level) for level in range(length + 1))
    beam = constrained_beam_search(lp, trie, widest, k, exclude)
    exact = exact_topk(lp, trie, k, exclude)
    assert np.array_equal(beam.scores, exact.scores)
    assert np.array_equal(beam.items >= 0, exact.items >= 0)


@pytest.mark.parametrize("neg_inf", [False, True])
def test_a_large_batch_gives_each_user_what_a_search_of_that_user_alone_gives(neg_inf):
    """Batching must not change answers: the service batches whatever arrives together. 64 users x
    beam 8 x 16 codes is past the size where the per-level ranking switches from one sort of all
    candidates to a per-user partition first; one user alone stays below it."""
    codes, lp, exclude = make_case(7, 3000, 3, 16, 64, 6, neg_inf)
    lp[:, :, :4] = lp[:, :, :1]  # exact ties between codes: the lower item must win either way
    trie = CodeTrie.from_codes(codes, 16)
    batched = constrained_beam_search(lp, trie, 8, 10, exclude)
    check_valid(batched, brute_force(lp, codes), exclude, 10)
    for b in range(len(lp)):
        alone = constrained_beam_search(lp[b : b + 1], trie, 8, 10, exclude[b : b + 1])
        assert np.array_equal(batched.items[b], alone.items[0])
        assert np.array_equal(batched.scores[b], alone.scores[0])


def test_seen_items_do_not_crowd_out_the_rest():
    # 4 prefixes x 3 leaves; the user has seen all 3 leaves of the best prefix and 2 of the second.
    codes = np.array([[p, c] for p in range(4) for c in range(3)])  # item = 3 * p + c
    trie = CodeTrie.from_codes(codes, 4)
    lp = np.log(np.array([[[0.7, 0.2, 0.06, 0.04], [0.5, 0.3, 0.2, 1e-9]]], dtype=np.float32))
    result = constrained_beam_search(lp, trie, beam_size=1, k=3, exclude=[np.array([0, 1, 2, 3, 4])])
    # left: (1, 2) = .2 * .2, (2, 0) = .06 * .5, (3, 0) = .04 * .5 although beam_size is 1
    assert result.items[0].tolist() == [5, 6, 9]
    check_valid(result, brute_force(lp, codes), [np.array([0, 1, 2, 3, 4])], 3)


def test_k_larger_than_catalog_pads_and_beam_below_k_still_fills():
    codes = np.array([[0, 0], [0, 1], [1, 0]])
    trie = CodeTrie.from_codes(codes, 2)
    lp = np.log(np.full((2, 2, 2), 0.5, dtype=np.float32))
    result = constrained_beam_search(lp, trie, beam_size=1, k=5)
    assert (result.items[:, 3:] == -1).all() and np.isneginf(result.scores[:, 3:]).all()
    assert sorted(result.items[0, :3].tolist()) == [0, 1, 2]
    result = constrained_beam_search(lp, trie, beam_size=1, k=2, exclude=[None, np.array([0, 1, 2])])
    assert result.items.tolist()[1] == [-1, -1] and len(set(result.items[0].tolist())) == 2


def test_bad_arguments_are_refused():
    trie = CodeTrie.from_codes(np.array([[0, 1], [1, 0]]), 2)
    lp = np.zeros((1, 2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"\[B, L=2, V=2\]"):
        constrained_beam_search(np.zeros((1, 2, 3)), trie, 2, 1)
    with pytest.raises(ValueError, match="NaN"):
        exact_topk(np.full((1, 2, 2), np.nan), trie, 1)
    with pytest.raises(ValueError, match="k must be"):
        constrained_beam_search(lp, trie, 2, 0)
    with pytest.raises(ValueError, match="beam_size"):
        constrained_beam_search(lp, trie, 0, 1)
    with pytest.raises(ValueError, match=r"exclude\[0\]"):
        constrained_beam_search(lp, trie, 2, 1, exclude=[np.array([2])])
    with pytest.raises(ValueError, match="one entry per user"):
        exact_topk(lp, trie, 1, exclude=[None, None])
