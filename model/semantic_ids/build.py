"""The semantic-ID pipeline: dataset -> item texts -> embeddings -> quantizer -> collision code -> table.

Each stage is timed and the table's ``meta`` records how it was built (method, levels, codebook
size, encoder, seed, seconds per stage, utilization, collisions), so a table found later on disk
explains itself and benchmark numbers come straight from it. The fitted quantizer itself is kept in
the table (``SemanticIdTable.quantizer``): a bundle gives items added after training their codes with
it (``model.semantic_ids.assign``, service/new_items.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from model.data.dataset import SequenceDataset
from model.semantic_ids.assign import CODEBOOKS
from model.semantic_ids.collisions import add_collision_code, utilization
from model.semantic_ids.encoders import CachedEncoder, TextEncoder
from model.semantic_ids.rqkmeans import residual_kmeans
from model.semantic_ids.rqvae import RQVAEConfig, quantizer_arrays, train_rqvae
from model.semantic_ids.table import SemanticIdTable

METHODS = ("rqvae", "rqkmeans")


@dataclass
class BuildConfig:
    method: str = "rqvae"
    levels: int = 3
    codebook_size: int = 256
    seed: int = 0
    epochs: int = RQVAEConfig.epochs  # RQ-VAE only
    kmeans_iters: int = 25  # RQ k-means only

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("levels", "codebook_size", "epochs", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def quantize(embeddings: np.ndarray, cfg: BuildConfig, progress: bool = True) -> tuple[np.ndarray, dict]:
    """Codes ``[N, levels]`` from the chosen quantizer, plus what it reports about its fit."""
    codes, fit, _ = fit_quantizer(embeddings, cfg, progress=progress)
    return codes, fit


def fit_quantizer(
    embeddings: np.ndarray, cfg: BuildConfig, progress: bool = True
) -> tuple[np.ndarray, dict, dict[str, np.ndarray]]:
    """``quantize``, plus the fitted quantizer's arrays (``model.semantic_ids.assign``), which the table
    keeps so items added later get their codes from the same quantizer."""
    if cfg.method == "rqkmeans":
        res = residual_kmeans(
            embeddings,
            cfg.levels,
            cfg.codebook_size,
            seed=cfg.seed,
            iters=cfg.kmeans_iters,
            progress=progress,
        )
        books = {CODEBOOKS: np.stack(res.codebooks).astype(np.float32)}
        return res.codes, {"residual_mse": res.residual_mse}, books
    rq_cfg = RQVAEConfig(levels=cfg.levels, codebook_size=cfg.codebook_size, epochs=cfg.epochs, seed=cfg.seed)
    rv = train_rqvae(embeddings, rq_cfg, progress=progress)
    last = rv.history[-1]
    fit = {"final_recon": last["recon"], "final_vq": last["vq"], "rqvae": rv.config}
    return rv.codes, fit, quantizer_arrays(rv.model)


def build_table(
    embeddings: np.ndarray,
    item_ids: list[str],
    cfg: BuildConfig,
    progress: bool = True,
    meta: dict | None = None,
) -> SemanticIdTable:
    """Quantize precomputed ``embeddings [N, D]`` (row i = ``item_ids[i]``) into a table."""
    if len(embeddings) != len(item_ids):
        raise ValueError(f"{len(embeddings)} embeddings for {len(item_ids)} items")
    timings = dict((meta or {}).get("seconds", {}))
    t = time.perf_counter()
    codes, fit, quantizer = fit_quantizer(embeddings, cfg, progress=progress)
    timings["quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    full, collision_stats = add_collision_code(codes, cfg.codebook_size)
    timings["collisions"] = time.perf_counter() - t
    info = {
        **(meta or {}),
        "method": cfg.method,
        "levels": cfg.levels,
        "codebook_size": cfg.codebook_size,
        "seed": cfg.seed,
        "epochs": cfg.epochs if cfg.method == "rqvae" else None,
        "embedding_dim": int(embeddings.shape[1]),
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "utilization": utilization(codes, cfg.codebook_size),
        **collision_stats,
        "fit": fit,
    }
    return SemanticIdTable(
        item_ids=list(item_ids), codes=full, codebook_size=cfg.codebook_size, meta=info, quantizer=quantizer
    )


def build_semantic_ids(
    dataset: SequenceDataset, encoder: TextEncoder, cfg: BuildConfig, progress: bool = True
) -> SemanticIdTable:
    """The whole pipeline for one dataset; embeddings are cached when ``encoder`` is a ``CachedEncoder``."""
    t = time.perf_counter()
    texts = dataset.item_texts()
    embeddings = encoder.encode(texts)
    embed_s = time.perf_counter() - t
    if embeddings.shape[0] != dataset.num_items:
        raise ValueError(f"encoder returned {embeddings.shape[0]} rows for {dataset.num_items} items")
    meta = {
        "dataset": dataset.name,
        "encoder": encoder.model_id,
        "embedding_cache_hit": encoder.last_hit if isinstance(encoder, CachedEncoder) else None,
        "seconds": {"embed": embed_s},
    }
    return build_table(embeddings, dataset.item_ids, cfg, progress=progress, meta=meta)
