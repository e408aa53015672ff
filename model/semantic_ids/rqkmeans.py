"""Residual k-means: the fast, deterministic quantizer.

Level 0 clusters the embeddings into ``codebook_size`` centroids; every next level clusters what the
previous levels left unexplained (the residual). Codes are coarse-to-fine like RQ-VAE's, so items
sharing a prefix are semantically close, but there is no training loop: a Beauty-sized catalog takes
seconds. The same ``kmeans`` also initialises the RQ-VAE codebooks.

Two forms of one k-means (GitHub issue 20): ``kmeans_reference`` is the plain numpy Lloyd loop, kept as
the reference the tests compare against; ``kmeans``, the one everything uses, draws the same k-means++
seeds and runs the Lloyd iterations with ``faiss.Clustering`` (faiss-cpu, already a dependency of the
ANN search mode). Why faiss: ``bench/bench_sid_scale.py`` (stages ``kmeans_ours``/``kmeans_faiss_pp``,
level 1 of RQ k-means, 256 centroids, 25 iterations, one thread) measured faiss started from our seeds
reaching the identical quantization error (0.340525 vs 0.340525 on the 200k-row sample we fit on) in
27.0 instead of 68.2 CPU seconds, and 3.8x faster at 1M rows with 2.0 instead of 7.1 GB peak RSS.
faiss started from its own random points is 5-8x faster but 0.3-0.7% worse, hence our seeding.
faiss runs exactly ``iters`` iterations (no early stop) on every row (no subsampling) and refills an
empty cluster by splitting a large one; the reference re-seeds it with the worst-fitted points.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from tqdm import tqdm


def _sq_dists(x: np.ndarray, c: np.ndarray, x_sq: np.ndarray | None = None) -> np.ndarray:
    """``[N, K]`` squared euclidean distances via ||x||^2 - 2 x.c + ||c||^2 (one matmul)."""
    if x_sq is None:
        x_sq = np.einsum("nd,nd->n", x, x)
    d = x_sq[:, None] - 2.0 * (x @ c.T) + np.einsum("kd,kd->k", c, c)[None, :]
    return np.maximum(d, 0.0, out=d)


def nearest(x: np.ndarray, c: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index of the nearest centroid for every row of ``x`` (chunked to bound memory)."""
    out = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), chunk):
        out[s : s + chunk] = _sq_dists(x[s : s + chunk], c).argmin(axis=1)
    return out


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding; falls back to uniform picks once every point coincides with a centre."""
    n = len(x)
    centres = np.empty((k, x.shape[1]), dtype=x.dtype)
    centres[0] = x[rng.integers(n)]
    closest = _sq_dists(x, centres[:1])[:, 0].astype(np.float64)
    for j in range(1, k):
        total = closest.sum()
        idx = rng.choice(n, p=closest / total) if total > 0 else rng.integers(n)
        centres[j] = x[idx]
        np.minimum(closest, _sq_dists(x, centres[j : j + 1])[:, 0], out=closest)
    return centres


def _centroids(x: np.ndarray, labels: np.ndarray, counts: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Mean of each cluster (sorted segment sums, O(N D)); an empty cluster keeps its old centre."""
    order = np.argsort(labels, kind="stable")
    filled = np.flatnonzero(counts)
    starts = np.concatenate([[0], np.cumsum(counts[filled])[:-1]])
    sums = np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
    out = old.copy()
    out[filled] = (sums / counts[filled, None]).astype(np.float32)
    return out


def kmeans(
    x: np.ndarray, k: int, seed: int = 0, iters: int = 25, tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ seeding (as ``kmeans_reference``), then ``iters`` Lloyd iterations by faiss.

    Returns ``(centroids [k, D], labels [N])``. Quantization error matches the reference's (parity
    tests); faiss keeps every code in use by splitting large clusters into empty ones. ``tol`` only
    applies where the reference runs instead: fewer points than ``k``, which faiss refuses.
    Deterministic for a given seed and thread count (faiss's seed is fixed, every row is used).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) == 0:
        raise ValueError("k-means needs at least one point")
    if len(x) < k or iters < 1:
        return kmeans_reference(x, k, seed=seed, iters=iters, tol=tol)
    centres = _kmeans_pp(x, k, np.random.default_rng(seed))
    cp = faiss.ClusteringParameters()
    cp.niter = iters
    cp.seed = seed
    cp.verbose = False
    cp.min_points_per_centroid = 1  # no "please provide more points" warning on small problems
    cp.max_points_per_centroid = -(-len(x) // k)  # every row, never faiss's 256-per-centroid sample
    clus = faiss.Clustering(x.shape[1], k, cp)
    faiss.copy_array_to_vector(centres.ravel(), clus.centroids)
    clus.train(x, faiss.IndexFlatL2(x.shape[1]))
    centres = faiss.vector_float_to_array(clus.centroids).reshape(k, x.shape[1]).astype(np.float32)
    return centres, nearest(x, centres)


def kmeans_reference(
    x: np.ndarray, k: int, seed: int = 0, iters: int = 25, tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding, numpy only: the reference form of ``kmeans``.

    Returns ``(centroids [k, D], labels [N])``; stops early once labels repeat or centres stop moving.

    Empty clusters are re-seeded with the points farthest from their centroid, so all ``k`` codes
    stay in use whenever there are at least ``k`` distinct points (that is what keeps codebook
    utilization high). Deterministic for a given seed.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) == 0:
        raise ValueError("k-means needs at least one point")
    rng = np.random.default_rng(seed)
    centres = _kmeans_pp(x, k, rng)
    x_sq = np.einsum("nd,nd->n", x, x)
    labels = np.full(len(x), -1, dtype=np.int64)
    for _ in range(iters):
        previous = centres
        d = _sq_dists(x, centres, x_sq)
        new = d.argmin(axis=1)
        point_err = d[np.arange(len(x)), new]
        counts = np.bincount(new, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            # re-seed empty clusters with the worst-fitted points, taking only from clusters that
            # keep at least one member (with fewer than k distinct points some stay empty)
            worst = iter(np.argsort(-point_err, kind="stable"))
            for e in empty:
                for p in worst:
                    if counts[new[p]] > 1 and point_err[p] > 0:
                        counts[new[p]] -= 1
                        new[p], counts[e] = e, 1
                        break
        centres = _centroids(x, new, counts, centres)
        shift = float(((centres - previous) ** 2).sum())
        if np.array_equal(new, labels) or shift <= tol:
            labels = new
            break
        labels = new
    return centres, nearest(x, centres)


@dataclass
class RQKMeansResult:
    codes: np.ndarray  # [N, levels] int64
    codebooks: list[np.ndarray]  # levels x [codebook_size, D]
    residual_mse: list[float]  # mean squared residual after each level


def residual_kmeans(
    embeddings: np.ndarray,
    levels: int = 3,
    codebook_size: int = 256,
    seed: int = 0,
    iters: int = 25,
    max_fit_points: int = 200_000,
    progress: bool = True,
) -> RQKMeansResult:
    """Quantize ``embeddings [N, D]`` into ``levels`` codes per item, each in ``[0, codebook_size)``.

    Codebooks are fitted on at most ``max_fit_points`` rows (a seeded sample) so million-item
    catalogs stay fast; every item is then assigned greedily level by level.
    """
    if levels < 1 or codebook_size < 1:
        raise ValueError(f"levels and codebook_size must be >= 1, got {levels}, {codebook_size}")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {x.shape}")
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.choice(len(x), max_fit_points, replace=False)) if len(x) > max_fit_points else None
    residual = x.copy()
    codes = np.empty((len(x), levels), dtype=np.int64)
    codebooks, mse = [], []
    for level in tqdm(range(levels), desc="rq-kmeans", unit="level", disable=not progress):
        fit = residual if fit_rows is None else residual[fit_rows]
        centres, _ = kmeans(fit, codebook_size, seed=seed + 1000 * level, iters=iters)
        codes[:, level] = nearest(residual, centres)
        residual -= centres[codes[:, level]]
        codebooks.append(centres)
        mse.append(float(np.mean(np.einsum("nd,nd->n", residual, residual))))
    return RQKMeansResult(codes=codes, codebooks=codebooks, residual_mse=mse)
