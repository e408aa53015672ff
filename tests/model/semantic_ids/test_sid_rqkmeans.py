import numpy as np
import pytest

from model.semantic_ids.rqkmeans import kmeans, kmeans_reference, residual_kmeans


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


@pytest.mark.parametrize("fit", [kmeans, kmeans_reference])
def test_kmeans_uses_every_code_when_points_allow(fit):
    # one huge blob plus a few far outliers: naive Lloyd leaves clusters empty; the reference re-seeds
    # them with the worst-fitted points, faiss splits large clusters into them
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(300, 4)), rng.normal(size=(5, 4)) + 50]).astype(np.float32)
    centres, labels = fit(x, 32, seed=0)
    assert centres.shape == (32, 4)
    assert len(np.unique(labels)) == 32


def test_fewer_points_than_codes_is_fine():
    x = np.eye(3, dtype=np.float32)
    res = residual_kmeans(x, levels=2, codebook_size=8, seed=0, progress=False)
    assert len(np.unique(res.codes[:, 0])) == 3


def quantization_error(x, centres, labels):
    r = x - centres[labels]
    return float(np.mean(np.einsum("nd,nd->n", r, r, dtype=np.float64)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faiss_kmeans_matches_reference_error(seed):
    # overlapping blobs, so Lloyd has real work to do: same k-means++ seeds, faiss's Lloyd vs ours
    x, _ = clustered(n_clusters=24, per_cluster=100, dim=16, spread=1.5, seed=seed)
    fast = quantization_error(x, *kmeans(x, 32, seed=seed))
    ref = quantization_error(x, *kmeans_reference(x, 32, seed=seed))
    assert abs(fast - ref) <= 1e-3 * ref


def test_faiss_kmeans_is_deterministic_for_a_seed():
    x, _ = clustered(n_clusters=24, per_cluster=100, dim=16, spread=1.5, seed=3)
    c1, l1 = kmeans(x, 32, seed=5)
    c2, l2 = kmeans(x, 32, seed=5)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(l1, l2)
    assert c1.dtype == np.float32 and c1.shape == (32, 16) and l1.dtype == np.int64


def test_fewer_points_than_codes_falls_back_to_reference():
    x = np.eye(3, dtype=np.float32)  # faiss refuses n < k
    for got, want in zip(kmeans(x, 8, seed=0), kmeans_reference(x, 8, seed=0), strict=True):
        np.testing.assert_array_equal(got, want)
