"""The FAIR network: a decoder-only Transformer over semantic-ID code tokens with focused attention.

One readable file, nanoGPT style. Shapes in comments use
  B batch, N items per history (left-padded, newest item last), L codes per item, V codebook size,
  T = N * L code tokens (+1 when the hashed user token is on), D model width, H heads.

Every item of the history contributes its L codes as L tokens (``item_tokens = "codes"``). Token
embedding = code embedding (one table per level, plus one MASK row per level for the code-masking
perturbation) + level embedding + item-position embedding (+ the item-ID embedding), the position
counted from the NEWEST item, so the newest item always has position 0 and left padding never shifts
the real items. ``item_tokens = "item"`` makes one token per item instead: its L code embeddings
summed + position (+ ID), T = N; attention (focused or standard) is the same.

Attention is causal over tokens and padded keys are masked. ``attention="focused"`` is the
Differential-Transformer form (two softmax maps, their lambda-weighted difference, per-head RMSNorm,
(1 - lambda_init) scale); ``attention="standard"`` is ordinary multi-head attention with everything
else identical, the baseline of the ablations.

At the last token of every item, L parallel heads give logits over each code of the NEXT item
(non-autoregressive multi-token prediction), so one pass trains on every item boundary and serving
needs a single forward pass per request (``next_item_scores``, the function exported to ONNX).

Item score. The score that training optimises and serving ranks by is one number per catalog item:

    score(i) = sum_l code_logits[l, code_l(i)]  +  query . item_vec(i)  +  item_bias(i)

the code part generalises across items that share codes (and carries items that never had an
interaction), the optional free item-ID part (``item_ids = true``: one embedding per item, tied between
input and output) is what lets the network tell apart items with similar text. Items without a trained
ID embedding (``item_trained`` False: no interaction in the training data) have that part fixed to 0, in
training and in serving alike, so they are ranked by their codes alone (cold start). With
``item_text = true`` every item also has a projected text part (a learned projection of its text
embedding) beside its ID row, cold items included: they rank by their codes and their text.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_KINDS = ("focused", "standard")
ITEM_TOKENS = ("codes", "item")


@dataclass
class FAIRConfig:
    """Architecture hyper-parameters; stored in every checkpoint as a plain dict."""

    num_levels: int = 4  # L: codes per item
    codebook_size: int = 256  # V: values per code
    max_items: int = 50  # longest history the position table covers (positions beyond share the last row)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1
    attention: str = "focused"  # "focused" | "standard"
    user_buckets: int = 0  # > 0: prepend one hashed user token (bucket = crc32(user id) % user_buckets)
    tie_output: bool = True  # output head of level j scores against the input code embeddings of level j
    item_ids: bool = True  # a free item-ID embedding beside the codes (input and output, one tied table)
    num_items: int = 0  # catalog size: rows of the item-ID table (set from the semantic-ID table at training)
    item_tokens: str = "item"  # "item": one token per item (codes summed) | "codes": L tokens per item
    # training only: share of history items whose ID embedding is left out of their input token, so the
    # network also learns to read an item from its codes alone (rare and new items; 0 = off)
    id_dropout: float = 0.0
    # item_text: the items' text embeddings (the MiniLM vectors the semantic IDs are quantized from), through
    # one learned projection, join the item-ID part on input and output; text_dim is their width, set from
    # the embeddings at training time. Unlike an ID row, the text part exists for every item, also for
    # items without a training interaction, and rare items share the projection with frequent ones.
    item_text: bool = False
    text_dim: int = 0

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.item_tokens not in ITEM_TOKENS:
            raise ValueError(f"item_tokens must be one of {ITEM_TOKENS}, got {self.item_tokens!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.attention == "focused" and (self.d_model // self.n_heads) % 2:
            raise ValueError("focused attention needs an even head width (d_model / n_heads)")
        for name in ("num_levels", "codebook_size", "max_items", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {self.num_items}")
        if self.text_dim < 0:
            raise ValueError(f"text_dim must be >= 0, got {self.text_dim}")
        if self.item_text and not self.item_ids:
            raise ValueError("item_text needs the item-ID part (item_ids = true)")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")

    @property
    def tokens_per_item(self) -> int:
        """Input tokens per history item: L (one per code) or 1 (the item's code embeddings summed)."""
        return self.num_levels if self.item_tokens == "codes" else 1

    @property
    def has_item_ids(self) -> bool:
        """Whether the network has a free item-ID table (asked for and a catalog size known)."""
        return self.item_ids and self.num_items > 0

    @property
    def has_item_text(self) -> bool:
        """Whether the network has the projected text part (asked for, ID table and text width known)."""
        return self.item_text and self.has_item_ids and self.text_dim > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FAIRConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown FAIRConfig keys: {sorted(unknown)}")
        # configs saved before these keys existed describe the only form there was then
        return cls(**{"item_tokens": "codes", "item_ids": False, **d})


class FAIROutput(NamedTuple):
    logits: torch.Tensor  # [B, N, L, V] next-item code logits at every item boundary
    history: torch.Tensor  # [B, N, D] history representation at every item boundary
    attn: list[torch.Tensor] | None  # per layer [B, H, T, T] final attention maps (focused: the difference)


def hash_user(user_id: str, buckets: int) -> int:
    """Stable (process-independent) bucket of a user id for the optional user token."""
    return zlib.crc32(user_id.encode()) % buckets


def lambda_init_for_layer(layer: int) -> float:
    """Differential-Transformer schedule, ``layer`` counted from 1: 0.2 at the first layer -> 0.8."""
    return 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))


# ---- attention kernels (pure functions: the tests compare them directly) ---------------------------


def _row_has_key(allowed: torch.Tensor) -> torch.Tensor:
    return allowed.any(dim=-1, keepdim=True)  # [B, 1, T, 1]


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. q,k [B,H,T,d], v [B,H,T,dv], allowed bool [B,1,T,T].

    Masked scores get the dtype's most negative value instead of -inf, so a row with no allowed key
    is a harmless uniform softmax that the final multiply by ``allowed`` turns into zeros (no NaN,
    no data-dependent branch: this is the form exported to ONNX). Returns (out, probs).
    """
    scale = 1.0 / math.sqrt(q.size(-1))
    scores = (q @ k.transpose(-2, -1)) * scale  # [B,H,T,T]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1) * allowed.to(scores.dtype)
    return probs @ v, probs


def focused_attention_reference(
    q1: torch.Tensor,
    k1: torch.Tensor,
    q2: torch.Tensor,
    k2: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor,
    allowed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q1 k1^T/sqrt d) - lam softmax(q2 k2^T/sqrt d)) v, plain form. Returns (out, diff map)."""
    _, p1 = reference_attention(q1, k1, v, allowed)
    _, p2 = reference_attention(q2, k2, v, allowed)
    diff = p1 - lam * p2  # [B,H,T,T], may be negative
    return diff @ v, diff


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Fused attention; rows with no allowed key attend everywhere then are zeroed, which keeps the
    backward pass free of NaN (a fully masked softmax row would poison the gradients)."""
    has = _row_has_key(allowed)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has)
    return out * has.to(out.dtype)


def focused_attention_fast(
    q1: torch.Tensor,
    k1: torch.Tensor,
    q2: torch.Tensor,
    k2: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """Same value as ``focused_attention_reference`` by linearity: A1 v - lam A2 v, two SDPA calls."""
    return _sdpa(q1, k1, v, allowed) - lam * _sdpa(q2, k2, v, allowed)


# ---- modules -------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SelfAttention(nn.Module):
    """Causal multi-head attention, focused (differential) or standard; same parameter count."""

    def __init__(self, cfg: FAIRConfig, layer: int) -> None:
        super().__init__()
        self.focused = cfg.attention == "focused"
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads  # value width per head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        if self.focused:
            half = self.head_dim // 2  # each of the two Q/K sets has half the head width
            self.lambda_init = lambda_init_for_layer(layer)
            self.lambda_q1 = nn.Parameter(torch.randn(half) * 0.1)
            self.lambda_k1 = nn.Parameter(torch.randn(half) * 0.1)
            self.lambda_q2 = nn.Parameter(torch.randn(half) * 0.1)
            self.lambda_k2 = nn.Parameter(torch.randn(half) * 0.1)
            self.head_norm = RMSNorm(self.head_dim)

    def lam(self) -> torch.Tensor:
        """lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init (a scalar shared by all heads)."""
        return (
            torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
            - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2))
            + self.lambda_init
        )

    def forward(
        self,
        x: torch.Tensor,
        allowed: torch.Tensor,
        plain: bool,
        return_attn: bool,
        last_query: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B,T,D] -> [B,T,D], or [B,1,D] with ``last_query`` (only the newest position asks:
        keys and values still come from every position)."""
        B, T, D = x.shape
        H, hd = self.n_heads, self.head_dim
        q, k, v = self.qkv(x).split(D, dim=-1)  # each [B,T,D]
        if last_query:
            q, allowed = q[:, -1:], allowed[:, :, -1:]  # [B,1,D], [B,1,1,T]
        Tq = q.size(1)
        v = v.view(B, T, H, hd).transpose(1, 2)  # [B,H,T,hd]
        attn = None
        if not self.focused:
            q = q.view(B, Tq, H, hd).transpose(1, 2)
            k = k.view(B, T, H, hd).transpose(1, 2)
            if plain or return_attn:
                y, attn = reference_attention(q, k, v, allowed)
            else:
                y = _sdpa(q, k, v, allowed)
        else:
            # split every head's query/key into the two halves: [B,H,T,2,hd/2]
            q = q.view(B, Tq, H, 2, hd // 2).permute(3, 0, 2, 1, 4)  # [2,B,H,Tq,hd/2]
            k = k.view(B, T, H, 2, hd // 2).permute(3, 0, 2, 1, 4)
            lam = self.lam().to(v.dtype)
            if plain or return_attn:
                y, attn = focused_attention_reference(q[0], k[0], q[1], k[1], v, lam, allowed)
            else:
                y = focused_attention_fast(q[0], k[0], q[1], k[1], v, lam, allowed)
            y = self.head_norm(y) * (1.0 - self.lambda_init)  # per-head RMSNorm, fixed rescale
        y = y.transpose(1, 2).reshape(B, Tq, D)
        return self.proj(y), (attn if return_attn else None)


class Block(nn.Module):
    def __init__(self, cfg: FAIRConfig, layer: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg, layer)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        allowed: torch.Tensor,
        plain: bool,
        return_attn: bool,
        last_query: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, attn = self.attn(self.ln1(x), allowed, plain, return_attn, last_query)
        x = (x[:, -1:] if last_query else x) + self.drop(a)  # [B,1,D] with last_query
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, attn


class FAIR(nn.Module):
    def __init__(self, cfg: FAIRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        L, V, D = cfg.num_levels, cfg.codebook_size, cfg.d_model
        # one table for all levels: row j * (V + 1) + c is code c of level j, row j * (V + 1) + V is MASK
        self.code_emb = nn.Embedding(L * (V + 1), D)
        # one token per item sums the levels' embeddings: a level embedding would only add a constant
        self.level_emb = nn.Embedding(L, D) if cfg.item_tokens == "codes" else None
        self.pos_emb = nn.Embedding(cfg.max_items, D)
        self.user_emb = nn.Embedding(cfg.user_buckets, D) if cfg.user_buckets > 0 else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, layer=i + 1) for i in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(D)
        # L parallel heads: one D x D projection per level, then scored against that level's code
        # embeddings (tied) or a separate D x V matrix
        self.head_proj = nn.Parameter(torch.empty(L, D, D))
        self.head_bias = nn.Parameter(torch.zeros(L, V))
        self.head_out = None if cfg.tie_output else nn.Parameter(torch.empty(L, V, D))
        # the free item-ID part: one table tied between input and output, a per-item bias, and the
        # projection of the history that scores against it. item_trained: which rows were trained.
        n_ids = cfg.num_items if cfg.has_item_ids else 0
        self.item_emb = nn.Embedding(n_ids, D) if n_ids else None
        self.item_bias = nn.Parameter(torch.zeros(n_ids)) if n_ids else None
        self.id_query = nn.Linear(D, D, bias=False) if n_ids else None
        self.register_buffer("item_trained", torch.ones(n_ids, dtype=torch.bool))
        # the projected text part: a fixed [I, text_dim] table (filled by the trainer, saved with the
        # weights) and one learned projection to D
        has_text = cfg.has_item_text
        self.text_proj = nn.Linear(cfg.text_dim, D, bias=False) if has_text else None
        # (None without it: the state dict of a network without text has no such key, as before it existed)
        self.register_buffer("item_text", torch.zeros(n_ids, cfg.text_dim) if has_text else None)
        # L_mi's learned inverse temperature (training only; not on the export path)
        self.mi_log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.apply(self._init)
        nn.init.normal_(self.head_proj, std=1.0 / math.sqrt(D))
        if self.head_out is not None:
            nn.init.normal_(self.head_out, std=0.02)
        self.register_buffer("level_offsets", torch.arange(L) * (V + 1), persistent=False)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def optimizer_groups(self, weight_decay: float, item_id_weight_decay: float = 0.0) -> list[dict]:
        """AdamW parameter groups: which weights decay is a property of the network, so it lives here.

        Parameters of two or more dimensions decay by ``weight_decay`` (the matrices, and also the
        per-level code bias ``head_bias`` [L, V]); embeddings, norms, 1-D biases and scalars do not,
        except the item-ID table with ``item_id_weight_decay > 0``: the one embedding with a row per
        item, most rows trained on a handful of interactions. That third group exists only when its
        decay is on, so checkpoints of two-group runs still resume. Every parameter is in exactly one
        group, in ``named_parameters`` order (a checkpoint's optimizer state is indexed by it).
        """
        decay, no_decay, item_ids = [], [], []
        for name, p in self.named_parameters():
            if name.startswith("item_emb.") and item_id_weight_decay > 0:
                item_ids.append(p)
            else:
                (decay if p.ndim >= 2 and "emb" not in name else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if item_ids:
            groups.append({"params": item_ids, "weight_decay": item_id_weight_decay})
        return groups

    @property
    def mask_code(self) -> int:
        """Code value that the code-masking perturbation writes (the per-level MASK embedding)."""
        return self.cfg.codebook_size

    def code_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., L] (values in [0, V], V = MASK) -> per-level code embeddings [..., L, D]."""
        return self.code_emb(codes + self.level_offsets)

    def level_code_table(self) -> torch.Tensor:
        """[L, V, D] embeddings of the real codes (MASK rows excluded)."""
        L, V = self.cfg.num_levels, self.cfg.codebook_size
        return self.code_emb.weight.view(L, V + 1, -1)[:, :V]

    def id_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """[I, D] (or [C, D] for the item indices ``items``) item-ID embeddings, rows of untrained items
        zeroed (their ID row is exactly 0), + the projected text part of every item when the network
        has one (only the rows asked for are projected)."""
        if items is None:
            weight, trained = self.item_emb.weight, self.item_trained
            text = self.item_text if self.text_proj is not None else None
        else:
            weight, trained = self.item_emb(items), self.item_trained[items]
            text = self.item_text[items] if self.text_proj is not None else None
        vec = weight * trained[:, None].to(weight.dtype)
        if text is not None:
            vec = vec + self.text_proj(text)
        return vec

    def id_bias(self) -> torch.Tensor:
        """[I] per-item bias, 0 for untrained items."""
        return self.item_bias * self.item_trained.to(self.item_bias.dtype)

    def id_input(self, items: torch.Tensor) -> torch.Tensor:
        """items [...] (-1 = padding or unknown) -> [..., D] ID embeddings, 0 where untrained/unknown
        (and, in training, for a ``id_dropout`` share of items), + the projected text part of every
        known item when the network has one."""
        known = items >= 0
        safe = items.clamp(min=0)
        keep = known & self.item_trained[safe]
        if self.training and self.cfg.id_dropout > 0:  # whole ID rows dropped, not rescaled
            keep = keep & (torch.rand(items.shape, device=items.device) >= self.cfg.id_dropout)
        ids = self.item_emb(safe) * keep[..., None].to(self.item_emb.weight.dtype)
        if self.text_proj is not None:  # every known item has a text part, trained or not
            ids = ids + self.text_proj(self.item_text[safe]) * known[..., None].to(ids.dtype)
        return ids

    def forward(
        self,
        codes: torch.Tensor,  # [B,N,L] int64
        item_mask: torch.Tensor,  # [B,N] bool, True for real items, left-padded
        return_attn: bool = False,
        user_buckets: torch.Tensor | None = None,  # [B] int64, only when cfg.user_buckets > 0
        plain: bool = False,
        items: torch.Tensor | None = None,  # [B,N] int64 item indices (-1: unknown), item-ID models only
        last_only: bool = False,
        id_inputs: torch.Tensor | None = None,  # [B,N,D] float: the items' ID inputs, instead of items
    ) -> FAIROutput:
        """Logits for the next item's L codes at every item boundary (+ history representation).

        ``plain=True`` (or ``return_attn``) uses the reference attention (the exported form);
        otherwise the fused SDPA kernels, which give the same numbers faster. ``last_only=True``
        keeps only the newest boundary (``logits`` [B,1,L,V], ``history`` [B,1,D]): serving needs no
        other, so the heads and the last block's queries and MLP run for the newest position alone
        (the heads at every boundary were ~28% of the exported graph's time).

        ``id_inputs`` replaces ``items`` for item-ID models: the vector each history item adds to its
        tokens, gathered outside the network. In eval mode ``id_input(items)`` is, row by row,
        ``id_vectors()[items]`` for known items and 0 for unknown/padding (-1), so the exported graph
        takes those rows and holds no [I, D] table (bundle schema 4: the runtime gathers them).
        """
        cfg = self.cfg
        B, N, L = codes.shape
        D = cfg.d_model
        # position from the newest item: N-1, ..., 1, 0 (clamped to the table size)
        pos = torch.clamp(torch.arange(N - 1, -1, -1, device=codes.device), max=cfg.max_items - 1)
        P = cfg.tokens_per_item  # L, or 1 with item_tokens = "item"
        if P == 1:  # one token per item: its code embeddings summed (+ position)
            x = self.code_embeddings(codes).sum(-2) + self.pos_emb(pos)  # [B,N,D]
        else:
            x = (
                self.code_embeddings(codes)  # [B,N,L,D]
                + self.level_emb.weight  # [L,D]
                + self.pos_emb(pos)[:, None, :]  # [N,1,D]
            )
        if self.item_emb is not None:
            if id_inputs is None and items is None:
                raise ValueError(
                    "this model has item-ID embeddings (item_ids = true): pass items (or id_inputs)"
                )
            ids = self.id_input(items) if id_inputs is None else id_inputs  # [B,N,D]
            x = x + (ids if P == 1 else ids[:, :, None, :])  # the item's ID joins each of its tokens
        x = x.reshape(B, N * P, D)
        key_real = item_mask[:, :, None].expand(B, N, P).reshape(B, N * P)  # [B,T]
        if self.user_emb is not None:
            if user_buckets is None:
                raise ValueError("this model has a user token (user_buckets > 0): pass user_buckets")
            x = torch.cat([self.user_emb(user_buckets)[:, None, :], x], dim=1)  # [B,1+T,D]
            key_real = torch.cat([torch.ones_like(key_real[:, :1]), key_real], dim=1)
        T = x.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=codes.device).tril()
        allowed = (causal[None] & key_real[:, None, :])[:, None]  # [B,1,T,T] query i may see key j
        x = self.drop(x)
        maps = [] if return_attn else None
        for i, block in enumerate(self.blocks):
            # last_only: the last block computes the newest position alone (its MLP and queries
            # elsewhere would feed nothing that is read)
            x, attn = block(
                x, allowed, plain, return_attn, last_query=last_only and i == len(self.blocks) - 1
            )
            if maps is not None:
                maps.append(attn)
        x = self.ln_f(x)
        # [B,N,D] hidden at the last token of every item; [B,1,D] (the newest token) with last_only
        history = x if last_only else x[:, T - N * P + P - 1 :: P]
        return FAIROutput(self.head_logits(history), history, maps)

    def head_logits(self, history: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., L, V]: the L parallel code heads."""
        h = torch.einsum("...d,lde->...le", history, self.head_proj)  # [...,L,D]
        table = self.level_code_table() if self.head_out is None else self.head_out  # [L,V,D]
        return torch.einsum("...le,lve->...lv", h, table) + self.head_bias

    def query(self, history: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., D]: what the item-ID part scores against (the history itself without IDs)."""
        return self.id_query(history) if self.id_query is not None else history

    def item_vectors(
        self, item_codes: torch.Tensor, items: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output side of the item score for the items ``items`` (default: all), whose codes are
        ``item_codes`` [C, L]: ``(vectors [C, L*D (+ D)], bias [C])``.

        The code part of the score, sum_l (W_l h) . E_l[c_l] + b_l[c_l], is a dot product of the
        stacked per-level queries with the stacked code embeddings, so the whole item score is ONE
        dot product: ``query_vectors(h) @ vectors.T + bias``.
        """
        L = self.cfg.num_levels
        table = self.level_code_table() if self.head_out is None else self.head_out  # [L,V,D]
        levels = torch.arange(L, device=item_codes.device)
        vec = table[levels, item_codes].flatten(-2)  # [C, L*D]
        bias = self.head_bias[levels, item_codes].sum(-1)  # [C]
        if self.item_emb is not None:
            if items is None:
                items = torch.arange(item_codes.size(0), device=item_codes.device)
            vec = torch.cat([vec, self.id_vectors(items)], dim=-1)
            bias = bias + self.id_bias()[items]
        return vec, bias

    def query_vectors(self, history: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., L*D (+ D)]: the stacked per-level head queries (+ the ID query)."""
        h = torch.einsum("...d,lde->...le", history, self.head_proj).flatten(-2)  # [..., L*D]
        if self.item_emb is not None:
            h = torch.cat([h, self.id_query(history)], dim=-1)
        return h

    def item_logits(
        self,
        history: torch.Tensor,
        item_codes: torch.Tensor,
        items: torch.Tensor | None = None,
        folded: bool | None = None,
    ) -> torch.Tensor:
        """history [P, D] -> item scores [P, C] for the items ``items`` (default all) with codes
        ``item_codes`` [C, L]: the score training optimises and serving ranks by (module docstring).

        Two forms of one product. Reference (``folded=False``): the stacked queries [P, Dq] against
        the stacked item vectors [C, Dq], Dq = L*D (+ D). Folded (``True``): ``query_vectors`` is
        linear in h with no bias, so it is ``h @ M`` with ``M = query_vectors(I_D)`` [D, Dq], and the
        score is ``h @ (vec @ M.T).T + bias``: C*Dq*D + P*D*C multiply-adds instead of P*Dq*C, about
        3x fewer for a training batch (P ~ 1,000 boundaries, Dq = 5D). The fold pays when P > ~D, so
        ``None`` picks it by shape; both forms are differentiable and equal up to float rounding.
        """
        vec, bias = self.item_vectors(item_codes, items)  # [C, Dq], [C]
        if folded is None:
            folded = history.size(0) * vec.size(1) > (history.size(0) + vec.size(1)) * history.size(1)
        if not folded:
            return self.query_vectors(history) @ vec.T + bias
        eye = torch.eye(history.size(-1), dtype=history.dtype, device=history.device)
        m = self.query_vectors(eye)  # [D, Dq]: row d = the query of the basis state e_d
        return history @ (vec @ m.T).T + bias  # [P, D] x [D, C]

    def next_item_scores(
        self,
        codes: torch.Tensor,  # [B,N,L] int64
        items: torch.Tensor,  # [B,N] int64 item indices (-1 = unknown item)
        item_mask: torch.Tensor,  # [B,N] bool
        user_buckets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the service needs to score every item, at the newest item: ``(code_scores [B,L,V],
        query [B,D])``, both float32. Item i scores ``sum_l code_scores[l, code_l(i)] + query .
        id_vector(i) + id_bias(i)`` (``model.search.scoring.ItemScorer``).

        Plain attention and no data-dependent Python control flow: this is what ``fair-export``
        traces to ONNX with dynamic B and N.
        """
        out = self.forward(
            codes, item_mask, user_buckets=user_buckets, plain=True, items=items, last_only=True
        )
        h = out.history[:, -1]  # [B,D]
        return out.logits[:, -1].float(), self.query(h).float()
