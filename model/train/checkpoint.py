"""Checkpoints: written atomically, loaded back into a ready ``FAIR`` network.

A checkpoint is a dict (see docs/architecture.md): ``model`` (state_dict), ``model_config``,
``train_config``, ``optimizer``, ``scheduler``, ``step``, ``epoch``, ``best_metric``, ``sid_sha256``,
``data_fingerprint``, ``rng``; with ``train.ema_decay > 0``, ``model`` is the weight average (what is
evaluated and exported) and ``train_model`` / ``ema_n_averaged`` hold the raw weights and the average's
count for a resume. Writing goes through a temp file in the same directory and
``os.replace`` so a crash mid-write never leaves a truncated ``checkpoint.pt`` behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from model.fair import FAIR, FAIRConfig

REQUIRED_KEYS = ("model", "model_config")
OBSOLETE_PREFIXES = ("mi_hist.", "mi_item.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable or lacking required entries."""


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def untrained_checkpoint(
    model_state: dict[str, Any],
    model_config: dict[str, Any],
    sid_sha256: str,
    train_config: dict[str, Any],
    data_fingerprint: str | None = None,
) -> dict[str, Any]:
    """A checkpoint of weights that were never trained (benchmarks, test fixtures): the same keys
    as the trainer writes, so every reader (export, fair-eval) treats it like a real run."""
    return {
        "model": model_state,
        "model_config": model_config,
        "train_config": train_config,
        "optimizer": {},
        "scheduler": {},
        "step": 0,
        "epoch": 0,
        "best_metric": 0.0,
        "sid_sha256": sid_sha256,
        "data_fingerprint": data_fingerprint,
        "rng": None,
    }


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").exists() else path / "checkpoint.pt"
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        # our own files; they hold numpy RNG state and plain dicts, hence weights_only=False
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    return ckpt


def load_model(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[FAIR, dict[str, Any]]:
    """Load a checkpoint file (or a run directory: its best.pt, else checkpoint.pt) -> (model in eval mode, dict)."""
    ckpt = read_checkpoint(path, map_location)
    model = FAIR(FAIRConfig.from_dict(ckpt["model_config"]))
    # the projection heads of the first L_mi form (training only) are not part of the network any more
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith(OBSOLETE_PREFIXES)}
    if model.level_emb is None:  # one-token models written while they still carried an unused level table
        state.pop("level_emb.weight", None)
    if "mi_log_scale" not in state and "head_proj" in state:  # written before L_mi had a temperature
        state["mi_log_scale"] = model.mi_log_scale.detach().clone()
    model.load_state_dict(state)
    model.to(map_location).eval()
    return model, ckpt
