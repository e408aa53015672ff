import numpy as np
import torch

from model.semantic_ids.collisions import utilization
from model.semantic_ids.rqvae import RQVAEConfig, train_rqvae


def test_rqvae_gives_valid_well_used_codes_on_clustered_embeddings():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(32, 24))
    labels = np.repeat(np.arange(32), 20)
    x = (centres[labels] + 0.1 * rng.normal(size=(len(labels), 24))).astype(np.float32)
    cfg = RQVAEConfig(
        levels=2, codebook_size=16, latent_dim=8, hidden=(32,), epochs=20, batch_size=128, lr=3e-3, seed=0
    )
    res = train_rqvae(x, cfg, progress=False)
    assert res.codes.shape == (640, 2) and res.codes.dtype == np.int64
    assert res.codes.min() >= 0 and res.codes.max() < 16
    assert min(utilization(res.codes, 16)) >= 0.8
    # training did something: reconstruction improved, and items of one cluster mostly share level 0
    assert res.history[-1]["recon"] < 0.5 * res.history[0]["recon"]
    purity = np.mean([np.bincount(res.codes[labels == c, 0]).max() / 20 for c in range(32)])
    assert purity >= 0.9
    # seeded: the same run gives the same codes
    short = RQVAEConfig(**{**cfg.__dict__, "epochs": 2})
    np.testing.assert_array_equal(
        train_rqvae(x, short, progress=False).codes, train_rqvae(x, short, progress=False).codes
    )
