"""The ``ann`` search mode: faiss IVF candidates over the folded table, rescored exactly, ranks as ``exact``
does when every list is probed, never returns an excluded item, and returns k items even when the
exclusions swallow most candidates."""

from __future__ import annotations

import numpy as np
import pytest

from model.search.folded import CodeHeads, FoldedScorer
from model.search.item_scores import ItemScorer
from model.search.modes.ann import AnnMode, attach_index, build_index, default_nlist, recall_at_k
from model.search.modes.base import SearchConfigError
from model.search.modes.exact import ExactMode
from model.search.modes.registry import get_mode, manifest_entry, mode_from_manifest
from model.semantic_ids.trie import CodeTrie

ITEMS, DIM, LEVELS, VOCAB = 200, 8, 2, 16


def _scorer(items: int = ITEMS, seed: int = 0) -> tuple[FoldedScorer, CodeTrie]:
    rng = np.random.default_rng(seed)
    flat = rng.choice(VOCAB**LEVELS, size=items, replace=False)
    codes = np.stack([flat // VOCAB, flat % VOCAB], axis=1).astype(np.int64)
    table = rng.normal(size=(items, DIM)).astype(np.float32)
    bias = rng.normal(scale=2.0, size=items).astype(np.float32)  # the bias matters to the ranking
    heads = CodeHeads(
        rng.normal(size=(DIM, LEVELS, VOCAB)).astype(np.float32), np.zeros((LEVELS, VOCAB), np.float32)
    )
    return FoldedScorer(codes, table, bias, heads), CodeTrie.from_codes(codes, VOCAB)


def _history(users: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(users, DIM)).astype(np.float32)


def test_ann_with_every_list_probed_ranks_as_exact():
    scorer, trie = _scorer()
    nlist = default_nlist(ITEMS)
    assert 1 < nlist < ITEMS  # a real partition, even at 200 items
    h = _history(40)
    exclude = [np.arange(u % 7) * 11 for u in range(40)]
    ann = AnnMode(candidates=50, nprobe=nlist).search(scorer, trie, (h,), 10, exclude)
    exact = ExactMode().search(scorer, trie, (h,), 10, exclude)
    np.testing.assert_array_equal(ann.items, exact.items)
    np.testing.assert_allclose(ann.scores, exact.scores, rtol=1e-6)
    assert recall_at_k(ann.items, exact.items) == 1.0


def test_the_bias_is_part_of_what_the_index_ranks():
    """A bias far above every inner product decides the exact top-10; one probed list of a plain
    inner-product index (no bias dimension) would not propose those items first."""
    scorer, trie = _scorer()
    boosted = np.arange(0, ITEMS, 20)  # 10 items
    bias = scorer.bias.copy()
    bias[boosted] += 100.0
    scorer = FoldedScorer(scorer.codes, scorer.table, bias, scorer.heads)
    got = AnnMode(candidates=10, nprobe=default_nlist(ITEMS)).search(scorer, trie, (_history(5),), 10)
    assert all(set(row) == set(boosted) for row in got.items.tolist())


def test_excluded_items_never_come_back_and_k_items_do_when_most_candidates_are_excluded():
    scorer, trie = _scorer()
    h = _history(6)
    exact_all = ExactMode().search(scorer, trie, (h,), ITEMS).items
    # each user's 150 best items are excluded: one probed list (~40 items) holds at most a few unseen
    exclude = [row[:150] for row in exact_all]
    mode = AnnMode(candidates=10, nprobe=1)
    got = mode.search(scorer, trie, (h,), 10, exclude)
    want = ExactMode().search(scorer, trie, (h,), 10, exclude)
    assert (got.items >= 0).all()
    for row, seen in zip(got.items, exclude, strict=True):
        assert not np.isin(row, seen).any()
    assert recall_at_k(got.items, want.items) > 0  # a real ranking, not any 10 unseen items


def test_k_is_handled_as_exact_handles_it_when_fewer_than_k_items_are_left():
    scorer, trie = _scorer()
    h = _history(3)
    exclude = [np.arange(ITEMS - 4), None, np.arange(ITEMS)]  # 4 left, all left, none left
    got = AnnMode(candidates=10, nprobe=1).search(scorer, trie, (h,), 10, exclude)
    want = ExactMode().search(scorer, trie, (h,), 10, exclude)
    assert [(row >= 0).sum() for row in got.items] == [4, 10, 0]
    np.testing.assert_array_equal(got.items[0], want.items[0])
    np.testing.assert_array_equal(got.items[2], want.items[2])


def test_an_attached_index_is_the_one_searched():
    scorer, trie = _scorer()
    other, _ = _scorer(seed=5)  # an index over another table: its candidates are other items
    index, info = build_index(other.table, other.bias, nlist=4)
    assert info | {"build_seconds": 0} == {
        "type": "IVF-Flat", "nlist": 4, "dim": DIM + 1, "metric": "inner_product", "build_seconds": 0
    }  # fmt: skip
    attach_index(scorer, index)
    h = _history(8)
    got = AnnMode(candidates=10, nprobe=1).search(scorer, trie, (h,), 10)
    own = AnnMode(candidates=10, nprobe=1).search(_scorer()[0], trie, (h,), 10)
    assert not np.array_equal(got.items, own.items)


def test_an_index_that_does_not_fit_the_table_is_refused():
    scorer, _ = _scorer()
    small, _ = _scorer(items=100)
    index, _ = build_index(small.table, small.bias)
    with pytest.raises(ValueError, match="holds 100 vectors"):
        attach_index(scorer, index)


def test_ann_needs_the_folded_score_and_enough_candidates():
    scorer, trie = _scorer()
    unfolded = ItemScorer(scorer.codes)
    with pytest.raises(SearchConfigError, match="folded item score"):
        AnnMode().search(unfolded, trie, (np.zeros((1, LEVELS, VOCAB), np.float32),) * 2, 10)
    with pytest.raises(SearchConfigError, match="candidates"):
        AnnMode(candidates=5).search(scorer, trie, (_history(1),), 10)
    assert AnnMode(candidates=5).at_least(10) == AnnMode(candidates=10)


def test_ann_is_registered_with_the_beams_candidates_and_its_own_nprobe():
    assert get_mode("ann") is AnnMode
    entry = manifest_entry(AnnMode(candidates=300, nprobe=32))
    assert entry == {"mode": "ann", "candidates": 300, "nprobe": 32}
    assert mode_from_manifest(entry) == AnnMode(candidates=300, nprobe=32)
    with pytest.raises(SearchConfigError, match="needs nprobe"):
        mode_from_manifest({"mode": "ann", "candidates": 300})
