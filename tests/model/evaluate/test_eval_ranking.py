"""Model ranking through the shared beam search, with a tiny randomly initialised FAIR network."""

import numpy as np
import pytest
import torch

from model.evaluate.ranking import invalid_rate, rank_items
from model.fair import FAIR, FAIRConfig
from model.semantic_ids.table import SemanticIdTable
from model.semantic_ids.trie import CodeTrie

NUM_ITEMS, L, V = 60, 3, 8


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    flat = rng.choice(V**L, size=NUM_ITEMS, replace=False)  # unique code tuples
    codes = np.stack([(flat // V**j) % V for j in reversed(range(L))], axis=1)
    table = SemanticIdTable([f"i{i}" for i in range(NUM_ITEMS)], codes, V)
    trie = CodeTrie.from_codes(table.codes, V)
    torch.manual_seed(0)
    model = FAIR(FAIRConfig(num_levels=L, codebook_size=V, max_items=8, d_model=16, n_layers=1, n_heads=2))
    histories = [rng.choice(NUM_ITEMS, size=n, replace=False) for n in [1, 3, 5, 8, 2, 7, 4]]
    return model, table, trie, histories


def test_returns_valid_distinct_unseen_items_best_first(setup):
    model, table, trie, histories = setup
    model.train()
    items, scores = rank_items(model, table, trie, histories, beam_size=12, k=10, batch_size=3)
    assert model.training  # mode restored
    assert items.shape == scores.shape == (len(histories), 10)
    assert ((items >= 0) & (items < NUM_ITEMS)).all()
    for u, hist in enumerate(histories):
        assert len(set(items[u].tolist())) == 10
        assert not np.isin(items[u], hist).any()
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    assert invalid_rate(items, table, trie, exclude=histories) == 0.0


def test_batching_does_not_change_the_ranking(setup):
    model, table, trie, histories = setup
    a, sa = rank_items(model, table, trie, histories, beam_size=12, k=10, batch_size=1)
    b, sb = rank_items(model, table, trie, histories, beam_size=12, k=10, batch_size=256)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-5)


def test_seen_items_come_back_when_not_excluded(setup):
    model, table, trie, histories = setup
    items, _ = rank_items(model, table, trie, histories, beam_size=NUM_ITEMS, k=NUM_ITEMS, exclude_seen=False)
    assert all(sorted(row.tolist()) == list(range(NUM_ITEMS)) for row in items)


def test_invalid_rate_is_measured_not_assumed(setup):
    _, table, trie, histories = setup
    items = np.array([[0, 1, 2], [3, 3, 99], [4, 5, -1]])
    assert invalid_rate(items, table, trie) == pytest.approx(2 / 8)  # the repeat and the out-of-catalog
    # a trie built from another table maps these items' codes to other items: all invalid
    other = CodeTrie.from_codes(table.codes[::-1].copy(), V)
    assert invalid_rate(np.array([[0, 1, 2]]), table, other) == 1.0


def test_empty_history_and_bad_sizes_are_errors(setup):
    model, table, trie, histories = setup
    with pytest.raises(ValueError, match="empty histories"):
        rank_items(model, table, trie, [np.array([1]), np.array([], dtype=np.int64)])
    with pytest.raises(ValueError, match="beam_size"):
        rank_items(model, table, trie, histories, beam_size=5, k=10)


def test_user_token_models_get_each_users_bucket(setup):
    _, table, trie, histories = setup
    torch.manual_seed(1)
    cfg = FAIRConfig(
        num_levels=L, codebook_size=V, max_items=8, d_model=16, n_layers=1, n_heads=2, user_buckets=5
    )
    model = FAIR(cfg)
    with torch.no_grad():
        model.user_emb.weight.mul_(50.0)  # make the user token matter for the ranking
    buckets = np.arange(len(histories)) % 5
    a, _ = rank_items(model, table, trie, histories, beam_size=12, k=10, batch_size=1, user_buckets=buckets)
    b, _ = rank_items(model, table, trie, histories, beam_size=12, k=10, batch_size=256, user_buckets=buckets)
    c, _ = rank_items(model, table, trie, histories, beam_size=12, k=10, user_buckets=(buckets + 1) % 5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
