"""RQ-VAE as in TIGER (Rajput et al., 2023): embeddings -> 32-d latent -> residual codes.

One readable file, nanoGPT style. An MLP encoder maps each item embedding to a small latent;
``levels`` codebooks quantize it residually (level l quantizes what levels < l left over); an MLP
decoder reconstructs the embedding from the sum of the chosen code vectors. Training minimises

    ||x - dec(z_q)||^2  +  sum_l ( ||sg[r_l] - e_l||^2  +  beta * ||r_l - sg[e_l]||^2 )

with a straight-through estimator so the reconstruction gradient reaches the encoder. Codebooks are
initialised by k-means on the first latents, and codes unused during an epoch are reset to residuals
of the last batch, which is what keeps per-level utilization high (TIGER reports >= 80%).
CPU, seeded, deterministic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model.semantic_ids.rqkmeans import residual_kmeans


@dataclass
class RQVAEConfig:
    levels: int = 3
    codebook_size: int = 256
    latent_dim: int = 32
    hidden: tuple[int, ...] = (512, 256, 128)
    beta: float = 0.25  # commitment weight
    epochs: int = 50  # TIGER trains far longer; 50 already gives full utilization on Beauty (CPU budget)
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-4
    init_points: int = 20_000  # latents used for the k-means codebook initialisation
    seed: int = 0


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    def __init__(self, input_dim: int, cfg: RQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = _mlp([input_dim, *cfg.hidden, cfg.latent_dim])  # [B, D] -> [B, d]
        self.decoder = _mlp([cfg.latent_dim, *reversed(cfg.hidden), input_dim])  # [B, d] -> [B, D]
        # [levels, K, d]: one codebook per level
        self.codebooks = nn.Parameter(torch.randn(cfg.levels, cfg.codebook_size, cfg.latent_dim) * 0.01)

    def quantize(
        self, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Greedy residual quantization of ``z [B, d]``.

        Returns ``(z_q [B, d], codes [B, levels], vq_loss, residuals)``; ``residuals[l] [B, d]``
        is what level l quantized (used to reset dead codes).
        """
        residual = z
        z_q = torch.zeros_like(z)
        codes, residuals = [], []
        vq_loss = z.new_zeros(())
        for level in range(self.cfg.levels):
            book = self.codebooks[level]  # [K, d]
            d = residual.pow(2).sum(1, keepdim=True) - 2 * residual @ book.T + book.pow(2).sum(1)[None, :]
            idx = d.argmin(dim=1)  # [B]
            e = book[idx]  # [B, d]
            # codebook moves towards the residual; encoder commits to the codebook
            vq_loss = (
                vq_loss + F.mse_loss(e, residual.detach()) + self.cfg.beta * F.mse_loss(residual, e.detach())
            )
            residuals.append(residual.detach())
            codes.append(idx)
            z_q = z_q + e
            residual = residual - e.detach()
        return z_q, torch.stack(codes, dim=1), vq_loss, residuals

    def forward(self, x: torch.Tensor):
        z = self.encoder(x)  # [B, d]
        z_q, codes, vq_loss, residuals = self.quantize(z)
        z_st = z + (z_q - z).detach()  # straight-through: decoder sees z_q, gradient flows to z
        x_hat = self.decoder(z_st)  # [B, D]
        recon = (x_hat - x).pow(2).sum(dim=1).mean()
        return x_hat, codes, recon, vq_loss, residuals

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """Codes ``[N, levels]`` for every row of ``x``."""
        out = [self.quantize(self.encoder(x[s : s + batch_size]))[1] for s in range(0, len(x), batch_size)]
        return torch.cat(out)


def quantizer_arrays(model: RQVAE) -> dict[str, np.ndarray]:
    """The fitted quantizer as plain float32 arrays (``model.semantic_ids.assign``): the encoder's
    linear layers (``encoder_weight_{i}`` ``[out, in]``, ``encoder_bias_{i}``) and the ``codebooks``
    ``[levels, V, d]``. The decoder is not kept: assigning codes never needs it."""
    out: dict[str, np.ndarray] = {}
    linears = [m for m in model.encoder if isinstance(m, nn.Linear)]
    for i, layer in enumerate(linears):
        out[f"encoder_weight_{i}"] = layer.weight.detach().cpu().numpy().astype(np.float32)
        out[f"encoder_bias_{i}"] = layer.bias.detach().cpu().numpy().astype(np.float32)
    out["codebooks"] = model.codebooks.detach().cpu().numpy().astype(np.float32)
    return out


@dataclass
class RQVAEResult:
    codes: np.ndarray  # [N, levels] int64
    model: RQVAE
    history: list[dict] = field(default_factory=list)  # per epoch: losses, dead codes reset
    config: dict = field(default_factory=dict)


@torch.no_grad()
def _init_codebooks(model: RQVAE, x: torch.Tensor, gen: torch.Generator) -> None:
    """k-means (residual, numpy) on the untrained encoder's latents, as TIGER initialises codebooks."""
    cfg = model.cfg
    rows = torch.randperm(len(x), generator=gen)[: cfg.init_points]
    z = model.encoder(x[rows]).numpy()
    res = residual_kmeans(z, cfg.levels, cfg.codebook_size, seed=cfg.seed, iters=10, progress=False)
    model.codebooks.copy_(torch.from_numpy(np.stack(res.codebooks)))


@torch.no_grad()
def _reset_dead_codes(
    model: RQVAE, usage: torch.Tensor, residuals: list[torch.Tensor], gen: torch.Generator
) -> int:
    """Move codes unused this epoch onto random residuals of the last batch (per level)."""
    reset = 0
    for level in range(model.cfg.levels):
        dead = torch.nonzero(usage[level] == 0).flatten()
        if len(dead) == 0:
            continue
        pool = residuals[level]
        pick = torch.randint(len(pool), (len(dead),), generator=gen)
        model.codebooks[level, dead] = pool[pick]
        reset += len(dead)
    return reset


def train_rqvae(embeddings: np.ndarray, cfg: RQVAEConfig | None = None, progress: bool = True) -> RQVAEResult:
    """Fit an RQ-VAE on ``embeddings [N, D]`` and return every item's codes ``[N, levels]``."""
    cfg = cfg or RQVAEConfig()
    if cfg.levels < 1 or cfg.codebook_size < 1 or cfg.epochs < 1:
        raise ValueError(f"levels, codebook_size and epochs must be >= 1, got {cfg}")
    x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be a non-empty [N, D] matrix, got shape {tuple(x.shape)}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = RQVAE(x.shape[1], cfg)
    _init_codebooks(model, x, gen)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    bar = tqdm(range(cfg.epochs), desc="rq-vae", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        usage = torch.zeros(cfg.levels, cfg.codebook_size, dtype=torch.long)
        order = torch.randperm(len(x), generator=gen)
        tot_recon = tot_vq = 0.0
        residuals: list[torch.Tensor] = []
        for s in range(0, len(x), cfg.batch_size):
            xb = x[order[s : s + cfg.batch_size]]
            _, codes, recon, vq_loss, residuals = model(xb)
            loss = recon + vq_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for level in range(cfg.levels):
                usage[level] += torch.bincount(codes[:, level], minlength=cfg.codebook_size)
            tot_recon += recon.item() * len(xb)
            tot_vq += vq_loss.item() * len(xb)
        # the last epoch resets nothing, so the final codes come from codebooks that were trained
        reset = _reset_dead_codes(model, usage, residuals, gen) if epoch < cfg.epochs - 1 else 0
        stats = {
            "epoch": epoch,
            "recon": tot_recon / len(x),
            "vq": tot_vq / len(x),
            "used": [int((u > 0).sum()) for u in usage],
            "reset": reset,
        }
        history.append(stats)
        bar.set_postfix(recon=f"{stats['recon']:.4f}", vq=f"{stats['vq']:.4f}", reset=reset)
    model.eval()
    codes = model.encode_codes(x).numpy().astype(np.int64)
    return RQVAEResult(codes=codes, model=model, history=history, config=asdict(cfg))
