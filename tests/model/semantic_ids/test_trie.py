"""CodeTrie: structure, lookups, npz round trip and the errors a corrupt file or bad codes must raise."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.semantic_ids.trie import CodeTrie, TrieError

REPO = Path(__file__).resolve().parents[3]

# item i -> code tuple; items 0 and 2 share the prefix (1,), items 0 and 3 share (1, 0)
CODES = np.array([[1, 0, 2], [0, 3, 1], [1, 2, 0], [1, 0, 0]])


def random_catalog(seed: int, num_items: int, length: int, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keys = rng.permutation(vocab**length)[: min(num_items, vocab**length)]
    return np.stack(np.unravel_index(keys, (vocab,) * length), axis=1).reshape(len(keys), length)


def test_levels_hold_the_sorted_distinct_prefixes():
    trie = CodeTrie.from_codes(CODES, codebook_size=4)
    assert trie.code_length == 3 and trie.num_items == 4
    assert [trie.num_nodes(lv) for lv in range(4)] == [1, 2, 3, 4]
    codes, kids = trie.children(0, 0)  # root -> prefixes (0,) and (1,)
    assert codes.tolist() == [0, 1] and kids.tolist() == [0, 1]
    codes, kids = trie.children(1, 1)  # (1,) -> (1, 0) and (1, 2), nodes 1 and 2 of level 2
    assert codes.tolist() == [0, 2] and kids.tolist() == [1, 2]
    codes, items = trie.children(2, 1)  # (1, 0) -> items 3 (code 0) and 0 (code 2)
    assert codes.tolist() == [0, 2] and items.tolist() == [3, 0]


def test_ancestors_and_leaf_counts_describe_subtrees():
    trie = CodeTrie.from_codes(CODES, codebook_size=4)
    assert trie.leaf_counts(0).tolist() == [4]
    assert trie.leaf_counts(1).tolist() == [1, 3]  # (0,) holds item 1; (1,) holds items 0, 2, 3
    assert trie.leaf_counts(2).tolist() == [1, 2, 1]
    leaves = trie.leaf_of_item()
    assert trie.items[leaves].tolist() == [0, 1, 2, 3]
    assert trie.ancestors(1)[leaves].tolist() == [1, 0, 1, 1]
    assert trie.ancestors(2)[leaves].tolist() == [1, 0, 2, 1]


def test_lookup_and_step_find_items_and_reject_other_tuples():
    trie = CodeTrie.from_codes(CODES, codebook_size=4)
    assert trie.lookup(CODES).tolist() == [0, 1, 2, 3]
    assert trie.lookup(np.array([[1, 0, 1], [3, 0, 0], [0, 3, 3]])).tolist() == [-1, -1, -1]
    assert trie.step(0, np.array([0, 0, 0, -1]), np.array([1, 2, 7, 1])).tolist() == [1, -1, -1, -1]
    with pytest.raises(TrieError, match="length 3"):
        trie.lookup(np.array([[1, 0]]))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    num_items=st.integers(0, 40),
    length=st.integers(1, 4),
    vocab=st.integers(1, 5),
)
def test_nodes_are_exactly_the_distinct_prefixes(seed, num_items, length, vocab):
    codes = random_catalog(seed, num_items, length, vocab)
    trie = CodeTrie.from_codes(codes, vocab)
    for level in range(length + 1):
        expected = len({tuple(row[:level]) for row in codes.tolist()}) if len(codes) or level == 0 else 0
        assert trie.num_nodes(level) == max(expected, 1 if level == 0 else 0)
    assert np.array_equal(trie.lookup(codes), np.arange(len(codes)))
    assert sorted(trie.items.tolist()) == list(range(len(codes)))


def test_npz_round_trip_without_pickle(tmp_path):
    codes = random_catalog(3, 200, 4, 6)
    trie = CodeTrie.from_codes(codes, 6)
    path = tmp_path / "trie.npz"
    np.savez(path, **trie.to_arrays())
    with np.load(path, allow_pickle=False) as z:
        loaded = CodeTrie.from_arrays(z)
    assert loaded.codebook_size == 6 and loaded.code_length == 4
    for a, b in zip(trie.indptr + trie.child_codes, loaded.indptr + loaded.child_codes, strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(loaded.lookup(codes), np.arange(200))


def test_bad_codes_are_refused():
    with pytest.raises(TrieError, match="not unique"):
        CodeTrie.from_codes(np.array([[0, 1], [2, 3], [0, 1]]), 4)
    with pytest.raises(TrieError, match=r"\[0, 4\)"):
        CodeTrie.from_codes(np.array([[0, 4]]), 4)
    with pytest.raises(TrieError, match="2-D"):
        CodeTrie.from_codes(np.array([0, 1]), 4)
    with pytest.raises(TrieError, match="integers"):
        CodeTrie.from_codes(np.array([[0.5, 1.0]]), 4)


def test_corrupt_arrays_are_refused_at_load():
    good = CodeTrie.from_codes(CODES, 4).to_arrays()
    broken_ptr = dict(good, indptr_1=np.array([0, 1, 1], dtype=np.int32))
    with pytest.raises(TrieError, match="level 1"):
        CodeTrie.from_arrays(broken_ptr)
    with pytest.raises(TrieError, match="permutation"):
        CodeTrie.from_arrays(dict(good, items=np.array([0, 0, 1, 2])))
    with pytest.raises(TrieError, match="version"):
        CodeTrie.from_arrays(dict(good, format_version=np.int64(99)))
    with pytest.raises(TrieError, match="lack"):
        CodeTrie.from_arrays({k: v for k, v in good.items() if k != "child_codes_2"})


def test_serving_modules_do_not_import_torch():
    code = (
        "import sys, model.semantic_ids.trie, model.search, model.search.beam, model.search.inputs; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
