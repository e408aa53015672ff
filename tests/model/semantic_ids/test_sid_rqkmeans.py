import numpy as np

from model.semantic_ids.rqkmeans import kmeans, residual_kmeans


def clustered(n_clusters=8, per_cluster=40, dim=16, spread=0.05, seed=0):
    """Well separated gaussian blobs; returns (points, true cluster of each point)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)) * 3
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    return (centres[labels] + spread * rng.normal(size=(len(labels), dim))).astype(np.float32), labels


def test_same_seed_same_codes_other_seed_still_valid():
    x, _ = clustered()
    a = residual_kmeans(x, levels=3, codebook_size=16, seed=7, progress=False)
    b = residual_kmeans(x, levels=3, codebook_size=16, seed=7, progress=False)
    c = residual_kmeans(x, levels=3, codebook_size=16, seed=8, progress=False)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert a.codes.shape == c.codes.shape == (320, 3)
    assert a.codes.dtype == np.int64
    assert a.codes.min() >= 0 and a.codes.max() < 16


def test_first_level_recovers_separated_clusters():
    x, labels = clustered(n_clusters=8)
    codes = residual_kmeans(x, levels=2, codebook_size=8, seed=0, progress=False).codes
    # a one-to-one map between true clusters and level-0 codes
    pairs = set(zip(labels.tolist(), codes[:, 0].tolist(), strict=True))
    assert len(pairs) == 8 and len({c for _, c in pairs}) == 8


def test_residual_error_shrinks_level_by_level():
    x, _ = clustered(spread=0.5)
    res = residual_kmeans(x, levels=3, codebook_size=8, seed=0, progress=False)
    assert res.residual_mse[0] > res.residual_mse[1] > res.residual_mse[2]


def test_kmeans_uses_every_code_when_points_allow():
    # one huge blob plus a few far outliers: naive Lloyd leaves clusters empty, we re-seed them
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(300, 4)), rng.normal(size=(5, 4)) + 50]).astype(np.float32)
    centres, labels = kmeans(x, 32, seed=0)
    assert centres.shape == (32, 4)
    assert len(np.unique(labels)) == 32


def test_fewer_points_than_codes_is_fine():
    x = np.eye(3, dtype=np.float32)
    res = residual_kmeans(x, levels=2, codebook_size=8, seed=0, progress=False)
    assert len(np.unique(res.codes[:, 0])) == 3
