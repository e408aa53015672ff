"""Model -> ranked items, through exactly the code path the service uses.

Histories become model inputs with ``model.search.inputs.histories_to_inputs``, the network gives the
next item's code scores and query (``FAIR.next_item_scores``, the exported form), and
the search mode (``model.search.modes``: exact scoring, or beam candidates rescored) turns them into
catalog items. Offline numbers are only worth something if they measure the thing that is served, so nothing
here re-implements the search.

The invalid-ID rate is measured, not assumed: every returned item is checked against the catalog
(index range, its code tuple resolving back to it through the trie), for repeats, and for seen items.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.evaluate.metrics import EMPTY, evaluation_report, invalid_item_mask, share_of_filled
from model.fair import hash_user
from model.search.inputs import histories_to_inputs
from model.search.item_scores import ItemScorer
from model.search.modes.base import SearchMode
from model.search.modes.registry import make_mode
from model.semantic_ids.table import SemanticIdTable
from model.semantic_ids.trie import CodeTrie
from model.train.checkpoint import load_model

SID_FILE = "semantic_ids.npz"  # the table a run directory keeps next to its checkpoints


def invalid_rate(
    items: np.ndarray,
    table: SemanticIdTable,
    trie: CodeTrie,
    exclude: Sequence[np.ndarray | None] | None = None,
) -> float:
    """Share of returned items that are not a valid recommendation (see ``metrics.invalid_item_rate``).

    On top of the index range, repeats and seen items, an item whose code tuple does not lead back to
    it through ``trie`` counts as invalid: that catches a trie built from another table than the one
    that maps items to codes.
    """
    items = np.asarray(items, dtype=np.int64)
    bad = invalid_item_mask(items, table.num_items, exclude)
    known = (items != EMPTY) & ~bad  # in range, so its code tuple can be looked up
    idx = items[known]
    bad[known] = trie.lookup(table.codes[idx]) != idx
    return share_of_filled(bad, items)


def item_scorer(model: torch.nn.Module, table: SemanticIdTable) -> ItemScorer:
    """The catalog side of ``model``'s item score as numpy (what a bundle ships as item_vectors.npz)."""
    if getattr(model, "item_emb", None) is None:
        return ItemScorer(np.asarray(table.codes, dtype=np.int64))
    with torch.no_grad():
        vectors = model.id_vectors().float().cpu().numpy()
        bias = model.id_bias().float().cpu().numpy()
    return ItemScorer(np.asarray(table.codes, dtype=np.int64), vectors, bias)


def rank_items(
    model: torch.nn.Module,
    table: SemanticIdTable,
    trie: CodeTrie,
    histories: Sequence[np.ndarray],
    search_mode: str | SearchMode = "exact",
    beam_size: int = 20,
    k: int = 10,
    batch_size: int = 256,
    exclude_seen: bool = True,
    device: str | torch.device = "cpu",
    max_history: int | None = None,
    user_buckets: np.ndarray | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank the catalog for every history with the shared search: ``search_mode`` a configured mode
    (``model.search.modes``), or a registered mode's name configured with ``beam_size`` as its
    ``candidates`` (exact ignores it; beam: candidates from the constrained beam, rescored); a
    configured mode ignores ``beam_size``.

    ``histories``: per user an int array of item indices, oldest first, non-empty (users without a
    history are the fallback's job, not the model's). ``max_history`` defaults to the longest given
    history (callers pass already truncated histories). ``user_buckets`` (int ``[U]``) only for models
    built with a hashed user token. Returns ``(items [U, k] int64, scores [U, k] float32)``; the
    model is left in the train/eval mode it came in.
    """
    mode = search_mode
    if isinstance(mode, str):
        if beam_size < k:
            raise ValueError(f"beam_size ({beam_size}) must be >= k ({k})")
        mode = make_mode(mode, {"candidates": beam_size})
    mode.check_k(k)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    empty = [u for u, h in enumerate(histories) if len(h) == 0]
    if empty:
        raise ValueError(
            f"{len(empty)} empty histories (first: user {empty[0]}): rank them with the fallback"
        )
    if max_history is None:
        max_history = max((len(h) for h in histories), default=1)
    num_users = len(histories)
    items = np.full((num_users, k), EMPTY, dtype=np.int64)
    scores = np.full((num_users, k), -np.inf, dtype=np.float32)
    # Batch users of similar history length together: a batch is padded to its longest history, and
    # short histories dominate (Amazon: mean ~7 of 20), so this cuts the forward cost several-fold.
    # Padding is masked, so the ranking of a user does not depend on its batch-mates.
    lengths = np.fromiter((min(len(h), max_history) for h in histories), dtype=np.int64, count=num_users)
    order = np.argsort(lengths, kind="stable")
    was_training = model.training
    model.eval()
    scorer = item_scorer(model, table)
    try:
        starts = range(0, num_users, batch_size)
        for start in tqdm(starts, desc="ranking", unit="batch", disable=not progress, leave=False):
            users = order[start : start + batch_size]
            batch = [np.asarray(histories[u], dtype=np.int64) for u in users]
            inputs = histories_to_inputs(batch, table.codes, max_history)
            extra = {}
            if user_buckets is not None:
                buckets = np.asarray(user_buckets, dtype=np.int64)[users]
                extra["user_buckets"] = torch.as_tensor(buckets, device=device)
            with torch.no_grad():
                code_scores, query = model.next_item_scores(
                    *(torch.as_tensor(a, device=device) for a in inputs), **extra
                )
            outputs = (code_scores.float().cpu().numpy(), query.float().cpu().numpy())
            result = mode.search(
                scorer,
                trie,
                outputs,
                k,
                exclude=batch if exclude_seen else None,
            )
            items[users] = result.items
            scores[users] = result.scores
    finally:
        model.train(was_training)
    return items, scores


class EvaluationError(ValueError):
    """A run or data that cannot be evaluated; the message names the file and what is wrong."""


CHECKPOINT_FILES = {"best": "best.pt", "latest": "checkpoint.pt"}


@dataclass
class LoadedRun:
    """Everything ranking needs from a training run directory."""

    path: Path
    checkpoint_path: Path
    model: torch.nn.Module
    checkpoint: dict[str, Any]
    table: SemanticIdTable
    trie: CodeTrie

    @property
    def user_buckets(self) -> int:
        return int(getattr(self.model.cfg, "user_buckets", 0))

    def max_history(self, default: int) -> int:
        """The history length the run was trained with (``train_config.max_history``), else ``default``."""
        value = (self.checkpoint.get("train_config") or {}).get("max_history")
        return int(value) if value else default


def load_run(run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu") -> LoadedRun:
    """Load a run directory's checkpoint (``best`` = best.pt, ``latest`` = checkpoint.pt) and its table.

    Fails with ``EvaluationError`` (one line, naming the file) when the directory, the checkpoint or
    ``semantic_ids.npz`` is missing, or when the checkpoint was trained on another semantic-ID table.
    """
    run = Path(run_dir)
    if which not in CHECKPOINT_FILES:
        raise EvaluationError(f"checkpoint must be one of {sorted(CHECKPOINT_FILES)}, got {which!r}")
    if not run.is_dir():
        raise EvaluationError(f"{run}: no such run directory")
    ckpt_path = run / CHECKPOINT_FILES[which]
    if not ckpt_path.is_file():
        raise EvaluationError(f"{ckpt_path}: no such checkpoint (is {run} a finished fair-train run?)")
    sid_path = run / SID_FILE
    if not sid_path.is_file():
        raise EvaluationError(f"{sid_path}: missing; the run directory must keep its semantic-ID table")
    table = SemanticIdTable.load(sid_path)
    model, ckpt = load_model(ckpt_path, map_location=device)
    recorded = ckpt.get("sid_sha256")
    if recorded and recorded != table.sha256():
        raise EvaluationError(f"{ckpt_path}: trained on another semantic-ID table than {sid_path}")
    cfg = model.cfg
    if (cfg.num_levels, cfg.codebook_size) != (table.code_length, table.codebook_size):
        raise EvaluationError(
            f"{ckpt_path}: model predicts {cfg.num_levels} codes of {cfg.codebook_size} values, "
            f"{sid_path} has {table.code_length} codes of {table.codebook_size}"
        )
    trie = CodeTrie.from_codes(table.codes, table.codebook_size)
    return LoadedRun(run, ckpt_path, model, ckpt, table, trie)


def evaluate_run(
    run: LoadedRun,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    user_ids: Sequence[str] | None = None,
    search_mode: str | SearchMode = "exact",
    beam_size: int = 20,
    k: int = 10,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    max_history: int | None = None,
    progress: bool = False,
) -> dict[str, float | int]:
    """Rank ``histories`` with the run's model and score against ``targets``: Recall/NDCG@5/10,
    ``invalid_rate`` (measured through the trie) and ``users``. ``user_ids`` only for user-token models."""
    buckets = None
    if run.user_buckets:
        if user_ids is None:
            raise EvaluationError(f"{run.checkpoint_path}: model has a user token; user ids are needed")
        buckets = np.array([hash_user(u, run.user_buckets) for u in user_ids], dtype=np.int64)
    items, _ = rank_items(
        run.model,
        run.table,
        run.trie,
        histories,
        search_mode=search_mode,
        beam_size=beam_size,
        k=k,
        batch_size=batch_size,
        device=device,
        max_history=max_history,
        user_buckets=buckets,
        progress=progress,
    )
    report = evaluation_report(items, targets, run.table.num_items)
    report["invalid_rate"] = invalid_rate(items, run.table, run.trie, exclude=histories)
    return report
