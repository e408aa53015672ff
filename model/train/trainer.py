"""The training loop: objectives, schedule, validation with early stopping, checkpoints, logs.

``Trainer(cfg, dataset, table, out_dir, ...).fit()`` is all ``fair-train`` does after parsing. The
run directory layout is the contract of docs/architecture.md. Every step reseeds its random streams
from ``(seed, step, rank)``, so a resumed run draws exactly the numbers the uninterrupted run would
have drawn, and DDP ranks draw different perturbations/dropout without any RNG state to ship.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from model.data.dataset import SequenceDataset
from model.evaluate.metrics import recall_ndcg
from model.evaluate.popularity import popularity_order
from model.evaluate.ranking import rank_items
from model.fair import FAIR, FAIRConfig, hash_user
from model.semantic_ids.table import SemanticIdTable
from model.semantic_ids.trie import CodeTrie
from model.train.batches import collate, epoch_batches, trained_items, training_windows
from model.train.checkpoint import read_checkpoint, save_checkpoint
from model.train.config import ConfigError, RunConfig, TrainConfig
from model.train.distributed import DistInfo, barrier, broadcast_floats
from model.train.item_init import text_init
from model.train.objectives import item_loss, mutual_info_loss, next_item_loss, robust_loss
from model.train.optim import RunOptimizer, clip_grad_norm, make_item_table_sparse, row_sparse_ids
from model.train.perturb import perturb_history
from model.train.plots import plot_curves
from model.train.sampled_softmax import NegativeSampler, sampled_item_logits, sampled_item_loss

METRIC = "ndcg@10"


def lr_factor(step: int, warmup: int, progress: float, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine down to ``min_ratio`` as ``progress`` -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_compatible(cfg: RunConfig, dataset: SequenceDataset, table: SemanticIdTable) -> RunConfig:
    """Fail before training on a table for another catalog; take L and V from the table."""
    table.check_catalog(dataset.item_ids, what=f"dataset {dataset.name!r}")
    if cfg.train.max_history > cfg.model.max_items:
        raise ConfigError(
            f"train.max_history={cfg.train.max_history} exceeds model.max_items={cfg.model.max_items}"
        )
    model = replace(
        cfg.model,
        num_levels=table.code_length,
        codebook_size=table.codebook_size,
        num_items=table.num_items if cfg.model.item_ids else 0,
    )
    return RunConfig(model=model, train=cfg.train)


def check_embeddings(embeddings: np.ndarray, num_items: int) -> None:
    if embeddings.ndim != 2 or embeddings.shape[0] != num_items or embeddings.shape[1] < 1:
        raise ConfigError(
            f"item text embeddings have shape {tuple(embeddings.shape)}, expected [{num_items} items, dim]"
        )
    if not np.isfinite(embeddings).all():
        raise ConfigError("item text embeddings contain NaN or inf")


def with_text_width(cfg: RunConfig, embeddings: np.ndarray | None, resume: bool) -> RunConfig:
    """``model.item_text``: take ``text_dim`` from the embeddings (a resumed run keeps its own)."""
    if not cfg.model.item_text:
        return cfg
    if embeddings is None:
        if resume and cfg.model.text_dim > 0:
            return cfg
        raise ConfigError("model.item_text = true needs the items' text embeddings")
    return RunConfig(model=replace(cfg.model, text_dim=int(embeddings.shape[1])), train=cfg.train)


def resolved_config(
    cfg: RunConfig,
    dataset: SequenceDataset,
    table: SemanticIdTable,
    embeddings: np.ndarray | None,
    resume: bool,
) -> RunConfig:
    """The run's config checked against its data, with the widths taken from the table and embeddings."""
    if embeddings is not None:
        check_embeddings(embeddings, table.num_items)
    return with_text_width(check_compatible(cfg, dataset, table), embeddings, resume)


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        dataset: SequenceDataset,
        table: SemanticIdTable,
        out_dir: str | Path,
        device: str = "cpu",
        max_minutes: float | None = None,
        resume: bool = False,
        dist: DistInfo | None = None,
        progress: bool = True,
        item_embeddings: np.ndarray | None = None,
    ) -> None:
        """``item_embeddings`` [items, E]: the items' text embeddings, needed (and only read) when a new
        run has ``train.item_id_init = "text"`` or ``model.item_text = true``."""
        self.dist = dist or DistInfo()
        self.cfg = resolved_config(cfg, dataset, table, item_embeddings, resume)
        self.dataset, self.table = dataset, table
        self.dataset.max_history = self.cfg.train.max_history
        self.out = Path(out_dir)
        self.device = device
        self.max_minutes = max_minutes
        self.progress = progress and self.dist.is_main
        self.sid_sha256 = table.sha256()
        self.fingerprint = dataset.fingerprint()
        self._index_training_data()
        self._pick_validation_users()
        self._build_model(item_embeddings, resume)
        self._build_negative_sampler()
        self.ddp = self._wrap_ddp()
        self._start_counters()
        self.optimizer = self._build_optimizer()
        if resume:
            self._restore()
        elif self.dist.is_main:
            self._prepare_run_dir()
        barrier(self.dist)

    # ---- construction ----------------------------------------------------------------------------
    def _index_training_data(self) -> None:
        """The catalog's codes (numpy for batches, on the device for scoring) and trie, the training
        windows, which items have a training interaction, and each user's hashed bucket."""
        t, table = self.cfg.train, self.table
        self.trie = CodeTrie.from_codes(table.codes, table.codebook_size)
        self.item_codes = table.codes
        self.item_codes_t = torch.from_numpy(table.codes).to(self.device)
        self.windows = training_windows(self.dataset, t.max_history)
        if not self.windows.seq:
            raise ValueError(f"dataset {self.dataset.name!r} has no user with a training target (>= 4 items)")
        self.trained = trained_items(self.windows, table.num_items)
        buckets = self.cfg.model.user_buckets
        self.user_buckets = (
            np.array([hash_user(u, buckets) for u in self.dataset.user_ids], dtype=np.int64)
            if buckets > 0
            else None
        )

    def _pick_validation_users(self) -> None:
        """One fixed sample of validation users per run, so successive validations are comparable."""
        t = self.cfg.train
        split = self.dataset.eval_split("valid")
        keep = np.flatnonzero([len(h) > 0 for h in split.histories])
        if t.eval_users and len(keep) > t.eval_users:
            keep = np.sort(np.random.default_rng(t.seed).choice(keep, t.eval_users, replace=False))
        self.valid_users = split.users[keep]
        self.valid_hist = [split.histories[i] for i in keep]
        self.valid_targets = split.targets[keep]

    def _build_model(self, item_embeddings: np.ndarray | None, resume: bool) -> None:
        """The network (identical initial weights on every rank), its fixed buffers, and the weight
        average when ``train.ema_decay > 0``."""
        t = self.cfg.train
        torch.manual_seed(t.seed)
        self.model = FAIR(self.cfg.model).to(self.device)
        with torch.no_grad():  # L_mi's temperature is learned, starting from train.tau
            self.model.mi_log_scale.fill_(math.log(1.0 / t.tau))
        if t.item_id_init == "text":
            self._init_ids_from_text(item_embeddings, resume)
        if self.model.text_proj is not None and item_embeddings is not None:
            self.model.item_text.copy_(torch.from_numpy(np.asarray(item_embeddings, dtype=np.float32)))
        if self.model.item_emb is not None:
            self.model.item_trained.copy_(torch.from_numpy(self.trained))
        # row-sparse ID table (before the weight average copies the network and before DDP wraps it)
        self.sparse_table = (
            make_item_table_sparse(self.model)
            if self.model.item_emb is not None
            and row_sparse_ids(t, self.table.num_items, self.dist.enabled, self.device)
            else None
        )
        # train.ema_decay: an exponential moving average of the weights (torch's AveragedModel) is what
        # validation ranks, best.pt keeps and fair-export ships; the raw weights only go on training.
        # Buffers are not averaged: AveragedModel copies them from the raw model at every update (the
        # fixed ones, item_trained and a text model's item_text, never change, so the copy is the same).
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay))
            if t.ema_decay > 0
            else None
        )

    def _build_negative_sampler(self) -> None:
        """Items without a training interaction are not in the training catalog: never a class of the
        full softmax and never drawn as a negative (else their codes' scores are pushed down for being
        absent, and an item that arrives after training could never be recommended). The proposal
        (``train.negative_sampler``) feeds the sampled softmax and L_robust's candidate set."""
        t, trained = self.cfg.train, self.trained
        self.softmax = t.softmax_for(self.table.num_items)
        self.untrained_t = torch.from_numpy(~trained).to(self.device) if not trained.all() else None
        seen = np.concatenate(self.windows.seq)
        counts = np.bincount(seen, minlength=self.table.num_items)
        self.sampler = NegativeSampler(
            counts, trained, t.negative_sampler, t.negative_sampler_alpha, self.device
        )

    def _wrap_ddp(self) -> DistributedDataParallel | None:
        if not self.dist.enabled:
            return None
        t = self.cfg.train
        return DistributedDataParallel(
            self.model,
            device_ids=None if self.device == "cpu" else [self.dist.local_rank],
            # every buffer (item_trained, the item_text table) is fixed after init and the same on
            # every rank: re-sending them from rank 0 at each forward would only cost time
            broadcast_buffers=False,
            # the InfoNCE heads take no gradient when L_mi is switched off
            find_unused_parameters=not (t.mi and t.beta > 0),
        )

    def _start_counters(self) -> None:
        """Where a new run starts; ``_restore`` overwrites them on a resume."""
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_metric = -1.0
        self.bad_evals = 0
        self.train_seconds = 0.0  # optimisation time only (validation excluded), kept across resumes

    def _build_optimizer(self) -> RunOptimizer:
        """AdamW over the network's own parameter groups (``FAIR.optimizer_groups``), and SparseAdam
        over the item-ID table when it is row-sparse (``train.sparse_item_ids``, ``model.train.optim``);
        warmup + cosine. Needs ``train_seconds``: under a time budget the schedule's position is
        training time."""
        t = self.cfg.train
        groups = self.model.optimizer_groups(t.weight_decay, t.item_id_weight_decay)
        betas = (t.betas[0], t.betas[1])
        return RunOptimizer(
            groups,
            t.lr,
            betas,
            lambda s: lr_factor(s, t.warmup_steps, self._progress(s), t.min_lr_ratio),
            sparse_table=self.sparse_table,
        )

    # ---- run directory ---------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.out / "checkpoint.pt").exists():
            raise FileExistsError(
                f"{self.out}: already holds a run; use --resume {self.out} or another --out"
            )
        self.cfg.save_json(self.out / "config.json")
        self.table.save(self.out / "semantic_ids.npz")
        popular = popularity_order(self.dataset.item_popularity(exclude_last=2))
        np.save(self.out / "popular.npy", popular.astype(np.int64))
        (self.out / "log.jsonl").write_text("")

    def _restore(self) -> None:
        ckpt = read_checkpoint(self.out / "checkpoint.pt")
        if ckpt["sid_sha256"] != self.sid_sha256:
            raise ValueError(f"{self.out}: --resume with another semantic-ID table than the run used")
        if ckpt["data_fingerprint"] != self.fingerprint:
            raise ValueError(f"{self.out}: --resume with other data than the run used")
        # keys added after the checkpoint was written count with their defaults (its run had none)
        saved_model = asdict(FAIRConfig(**ckpt["model_config"]))
        saved_train = asdict(TrainConfig.from_saved(ckpt["train_config"]))
        if saved_model != self.cfg.to_dict()["model"] or saved_train != self.cfg.to_dict()["train"]:
            raise ValueError(f"{self.out}: --resume with another config than the run's config.json")
        if self.ema is not None:
            self.model.load_state_dict(ckpt["train_model"])
            self.ema.module.load_state_dict(ckpt["model"])
            self.ema.n_averaged.fill_(ckpt["ema_n_averaged"])
        else:
            self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt)
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        self.batch_in_epoch = ckpt["rng"]["batch_in_epoch"]
        self.best_metric = ckpt["best_metric"]
        self.bad_evals = ckpt["rng"]["bad_evals"]
        self.train_seconds = ckpt["rng"].get("train_seconds", 0.0)

    def _init_ids_from_text(self, embeddings: np.ndarray | None, resume: bool) -> None:
        """``train.item_id_init = "text"``: the ID table starts from the PCA of the text embeddings
        (``model.train.item_init``; ``RunConfig`` ensures there is an ID table). A resumed run loads its
        weights instead and needs none."""
        if resume and embeddings is None:
            return
        if embeddings is None:
            raise ConfigError('train.item_id_init = "text" needs the items\' text embeddings')
        with torch.no_grad():
            self.model.item_emb.weight.copy_(
                text_init(embeddings, self.cfg.model.d_model, std=self.cfg.train.item_id_init_std)
            )

    def _progress(self, step: int) -> float:
        """Position in the cosine schedule: by training time under a time budget, else by steps."""
        t = self.cfg.train
        if t.budget_minutes > 0:
            return self.train_seconds / (60.0 * t.budget_minutes)
        return (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)

    def _checkpoint(self) -> dict[str, Any]:
        cfg = self.cfg.to_dict()
        ckpt = {
            # the weights that are evaluated and exported: the average when train.ema_decay > 0
            "model": self._eval_model().state_dict(),
            "model_config": cfg["model"],
            "train_config": cfg["train"],
            **self.optimizer.state_dict(),  # optimizer, scheduler (+ sparse_optimizer, sparse_scheduler)
            "step": self.step,
            "epoch": self.epoch,
            "best_metric": self.best_metric,
            "sid_sha256": self.sid_sha256,
            "data_fingerprint": self.fingerprint,
            # every random stream is reseeded from (seed, step, rank): the position in the epoch's
            # batch order and the early-stopping counter are all the state a resume needs
            "rng": {
                "seed": self.cfg.train.seed,
                "batch_in_epoch": self.batch_in_epoch,
                "bad_evals": self.bad_evals,
                "train_seconds": self.train_seconds,
            },
        }
        if self.ema is not None:  # what a resume continues from
            ckpt["train_model"] = self.model.state_dict()
            ckpt["ema_n_averaged"] = int(self.ema.n_averaged.item())
        return ckpt

    def _eval_model(self) -> FAIR:
        """The network validation ranks and checkpoints keep: the weight average if there is one."""
        return self.model if self.ema is None else self.ema.module

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # ---- one optimisation step -------------------------------------------------------------------
    def _seed_step(self) -> torch.Generator:
        base = (self.cfg.train.seed * 1_000_003 + self.step) * 64 + self.dist.rank
        torch.manual_seed(base)  # dropout
        gen = torch.Generator(device=self.device)
        gen.manual_seed(base + 7)
        return gen

    def _sampled_items(
        self, targets: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L_robust's candidates under the full softmax: the batch's distinct targets plus
        ``num_negatives`` items drawn from the proposal: (candidate items [C], column of each target)."""
        sampled = self.sampler.draw(self.cfg.train.num_negatives, gen)
        cand, inverse = torch.unique(torch.cat([targets, sampled]), return_inverse=True)
        return cand, inverse[: targets.numel()]

    def _full_logits(self, history: torch.Tensor) -> torch.Tensor:
        """Scores of the whole catalog, untrained items masked out of the softmax."""
        logits = self.model.item_logits(history, self.item_codes_t)
        return logits if self.untrained_t is None else logits.masked_fill(self.untrained_t, float("-inf"))

    def _candidate_logits(self, history: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Scores of the candidates ``cand`` corrected by ``-log Q``: L_robust's distributions."""
        return self.model.item_logits(history, self.item_codes_t[cand], cand) - torch.log(
            self.sampler.q[cand]
        )

    def _next_loss(self, history: torch.Tensor, targets: torch.Tensor, gen: torch.Generator):
        """L_next and, for L_robust, (candidates [C], clean logits over them [P, C] or None).

        Full: the catalog's softmax (robust draws its own candidates later). Sampled: the positive
        and ``num_negatives`` shared draws (``model.train.sampled_softmax``); L_robust reuses the
        distinct items scored, so no item is scored twice."""
        if self.softmax == "full":
            return item_loss(self._full_logits(history), targets), None, None
        k = self.cfg.train.num_negatives
        negatives = self.sampler.draw(k, gen)
        s = sampled_item_logits(
            self.model, history, self.item_codes_t, targets, negatives,
            self.sampler.log_expected_count(negatives, k),
        )  # fmt: skip
        return sampled_item_loss(s.logits), s.cand, s.cand_logits - torch.log(self.sampler.q[s.cand])

    def losses(self, batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """All loss terms of one batch; ``total`` is what gets back-propagated."""
        t = self.cfg.train
        net = self.ddp or self.model
        valid = batch.valid
        users = (
            torch.from_numpy(self.user_buckets[batch.users.cpu().numpy()]).to(self.device)
            if self.user_buckets is not None
            else None
        )
        use_robust = t.robust and t.alpha > 0
        want_attn = use_robust and t.robust_attn_weight > 0
        with torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16, enabled=t.bf16):
            clean = net(
                batch.codes, batch.item_mask, return_attn=want_attn, user_buckets=users, items=batch.items
            )
            history = clean.history[valid]  # [P,D]
            targets = batch.target_items[valid]  # [P]
            next_loss, cand, cand_logits = self._next_loss(history, targets, gen)
            out = {"next": next_loss}
            total = out["next"]
            if t.code_loss_weight > 0:
                out["code"] = next_item_loss(clean.logits, batch.target_codes, valid)
                total = total + t.code_loss_weight * out["code"]
            if use_robust:
                p = perturb_history(
                    batch.codes, batch.items, batch.item_mask, self.item_codes_t, self.model.mask_code,
                    t.perturb_rate, t.perturb_ops, gen,
                )  # fmt: skip
                pert = net(p.codes, p.item_mask, return_attn=want_attn, user_buckets=users, items=p.items)
                kept = p.kept & valid
                # the prediction term compares the two next-item distributions over a candidate set
                # (the batch's targets + sampled items, as the sampled softmax): over the whole catalog
                # it cost more than the rest of the step (docs/benchmarks.md, training speed)
                if cand is None:
                    cand, _ = self._sampled_items(targets, gen)
                    clean_kept = self._candidate_logits(history[kept[valid]], cand)
                else:
                    clean_kept = cand_logits[kept[valid]]
                pert_logits = self._candidate_logits(pert.history[kept], cand)
                pred, attn = robust_loss(
                    clean_kept, pert_logits, clean, pert, kept, t.robust_attn_weight,
                    self.cfg.model.tokens_per_item,
                )  # fmt: skip
                out["robust"] = pred + t.robust_attn_weight * attn
                out["robust_attn"] = attn
                total = total + t.alpha * out["robust"]
            if t.mi and t.beta > 0:
                out["mi"] = mutual_info_loss(self.model, history, targets, self.item_codes_t)
                total = total + t.beta * out["mi"]
        out["loss"] = total
        return out

    def train_step(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimisation step on ``batch`` (losses, backward, clipping, AdamW, weight average):
        ``(loss terms, gradient norm)``. The schedule and counters are ``fit``'s; a benchmark times
        this exact step (bench/bench_train_scale.py)."""
        terms = self.losses(batch, self._seed_step())
        self.optimizer.zero_grad()
        terms["loss"].backward()
        gnorm = clip_grad_norm(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return terms, gnorm

    # ---- validation ------------------------------------------------------------------------------
    def evaluate(self, histories, targets, users=None, progress: bool = False) -> dict[str, float]:
        items, _ = rank_items(
            self._eval_model(),
            self.table,
            self.trie,
            histories,
            search_mode=self.cfg.train.eval_search,
            beam_size=self.cfg.train.eval_beam,
            k=10,
            device=self.device,
            max_history=self.cfg.train.max_history,
            user_buckets=None if self.user_buckets is None else self.user_buckets[users],
            progress=progress,
        )
        return recall_ndcg(items, targets, ks=(5, 10))

    def _validate(self) -> dict[str, float]:
        return self.evaluate(self.valid_hist, self.valid_targets, self.valid_users)

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self, stop_at_step: int | None = None) -> dict[str, Any]:
        """Train until max_steps / max_epochs / early stop / --max-minutes / ``stop_at_step``."""
        t = self.cfg.train
        start = time.monotonic()
        net = self.ddp or self.model
        net.train()
        stop_reason = None
        bar = tqdm(
            total=t.max_steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True
        )
        seqs, tick = 0, time.monotonic()
        while stop_reason is None:
            if self.epoch >= t.max_epochs:
                stop_reason = "max_epochs"
                break
            batches = epoch_batches(self.windows, t.batch_size, t.seed, self.epoch, self.dist.world_size)
            mine = batches[self.dist.rank :: self.dist.world_size]
            while self.batch_in_epoch < len(mine):
                step_start = time.monotonic()
                batch = collate(self.windows, mine[self.batch_in_epoch], self.item_codes).to(self.device)
                terms, gnorm = self.train_step(batch)
                self.train_seconds += time.monotonic() - step_start
                self.optimizer.schedule_step()
                self.step += 1
                self.batch_in_epoch += 1
                seqs += batch.codes.size(0) * self.dist.world_size
                if self.step % t.log_every == 0:
                    now = time.monotonic()
                    rec = {k: round(v.item(), 5) for k, v in terms.items()}
                    rec.update(
                        kind="train", step=self.step, epoch=self.epoch, lr=self.optimizer.last_lr(),
                        grad_norm=round(float(gnorm), 4), seq_per_s=round(seqs / (now - tick), 1),
                    )  # fmt: skip
                    seqs, tick = 0, now
                    self._log(rec)
                    bar.set_postfix(
                        {k: rec[k] for k in ("loss", "next", "robust", "mi", "seq_per_s") if k in rec}
                    )
                bar.update(1)
                over_time = self.max_minutes is not None and time.monotonic() - start > 60 * self.max_minutes
                over_budget = t.budget_minutes > 0 and self.train_seconds >= 60 * t.budget_minutes
                over_time, over_budget = (
                    bool(x) for x in broadcast_floats([float(over_time), float(over_budget)], self.dist)
                )
                if (
                    self.step % t.eval_every == 0
                    or self.step >= t.max_steps
                    or over_time
                    or over_budget
                    or self.step == stop_at_step
                ):
                    if self._validate_and_save() >= t.patience:
                        stop_reason = "early_stopping"
                    elif self.step >= t.max_steps:
                        stop_reason = "max_steps"
                    elif over_time:
                        stop_reason = "max_minutes"
                    elif over_budget:
                        stop_reason = "budget_minutes"
                    elif self.step == stop_at_step:
                        stop_reason = "stop_at_step"
                    net.train()
                    if stop_reason:
                        break
            if stop_reason is None:
                self.epoch += 1
                self.batch_in_epoch = 0
        bar.close()
        summary = {"kind": "stop", "step": self.step, "epoch": self.epoch, "reason": stop_reason,
                   "best_" + METRIC: self.best_metric, "softmax": self.softmax, "sparse_item_ids": self.sparse_table is not None, "minutes": round((time.monotonic() - start) / 60, 2)}  # fmt: skip
        self._log(summary)
        if self.dist.is_main:
            plot_curves(self.out / "log.jsonl", self.out / "curves.png")
        barrier(self.dist)
        return summary

    def _validate_and_save(self) -> int:
        """Validate on rank 0, keep best.pt, write checkpoint.pt; returns the no-improvement count."""
        if self.dist.is_main:
            metrics = self._validate()
            improved = metrics[METRIC] > self.best_metric
            if improved:
                self.best_metric = metrics[METRIC]
                self.bad_evals = 0
            else:
                self.bad_evals += 1
            self._log({"kind": "valid", "step": self.step, "epoch": self.epoch, **metrics})
            ckpt = self._checkpoint()
            save_checkpoint(self.out / "checkpoint.pt", ckpt)
            if improved:
                shutil.copyfile(self.out / "checkpoint.pt", self.out / ".best.pt.tmp")
                (self.out / ".best.pt.tmp").replace(self.out / "best.pt")
        self.best_metric, bad = broadcast_floats([self.best_metric, float(self.bad_evals)], self.dist)
        self.bad_evals = int(bad)
        return self.bad_evals

    # ---- final metrics ---------------------------------------------------------------------------
    def final_metrics(self) -> dict[str, Any]:
        """Valid and test metrics of best.pt on ALL users, written to metrics.json (rank 0 only)."""
        if not self.dist.is_main:
            return {}
        best = read_checkpoint(self.out / "best.pt")
        self._eval_model().load_state_dict(best["model"])
        result: dict[str, Any] = {"step": best["step"]}
        for name in ("valid", "test"):
            split = self.dataset.eval_split(name)
            keep = [i for i, h in enumerate(split.histories) if len(h) > 0]
            hist = [split.histories[i] for i in keep]
            result[name] = self.evaluate(hist, split.targets[keep], split.users[keep], progress=self.progress)
            result[name]["users"] = len(keep)
        tmp = self.out / ".metrics.json.tmp"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(self.out / "metrics.json")
        return result
