"""Checkpoints: written atomically, loaded back into a ready ``FAIR`` network.

A checkpoint is a dict (see docs/architecture.md): ``model`` (state_dict), ``model_config``,
``train_config``, ``optimizer``, ``scheduler``, ``step``, ``epoch``, ``best_metric``, ``sid_sha256``,
``data_fingerprint``, ``rng``; with ``train.ema_decay > 0``, ``model`` is the weight average (what is
evaluated and exported) and ``train_model`` / ``ema_n_averaged`` hold the raw weights and the average's
count for a resume. Writing goes through a temp file in the same directory and
``os.replace`` so a crash mid-write never leaves a truncated ``checkpoint.pt`` behind.

Every entry is a tensor or a plain type (dict, list, tuple, str, int, float, bool, None), so reading
uses ``torch.load(weights_only=True)``: a checkpoint is unpickled by a loader that only rebuilds
tensors and plain containers, and a file that asks for anything else (a class, a function, numpy
state) is refused instead of running its pickled code. Checkpoints travel (resume, fair-eval,
fair-export, and the k8s job whose exporter writes the bundles every API pod loads): a file that is
not ours must not be able to execute code on the machine that reads it.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from model.fair import FAIR, FAIRConfig

REQUIRED_KEYS = ("model", "model_config")
OBSOLETE_PREFIXES = ("mi_hist.", "mi_item.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable or lacking required entries."""


# what torch.load(weights_only=True) rebuilds; compared by exact type, because numpy scalars subclass
# float/int yet are refused on reading (they unpickle through a numpy global)
PLAIN_LEAVES = (str, int, float, bool, complex, bytes, type(None), torch.dtype, torch.device, torch.Size)
PLAIN_CONTAINERS = (dict, OrderedDict, list, tuple, set)


def unloadable_entry(obj: Any, where: str = "checkpoint") -> str | None:
    """Where in ``obj`` the first value that ``weights_only`` loading would refuse sits, or None."""
    if isinstance(obj, torch.Tensor) or type(obj) in PLAIN_LEAVES:
        return None
    if type(obj) not in PLAIN_CONTAINERS:
        return f"{where} ({type(obj).__module__}.{type(obj).__qualname__})"
    if isinstance(obj, dict):
        items = [(f"{where}[{k!r}]", v) for k, v in obj.items()] + [(f"{where} key", k) for k in obj]
    else:
        items = [(f"{where}[{i}]", v) for i, v in enumerate(obj)]
    return next((bad for w, v in items if (bad := unloadable_entry(v, w)) is not None), None)


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> Path:
    """Write ``checkpoint`` atomically; refuses (before writing) anything ``read_checkpoint`` would not
    load back, so a run never finds out at resume or export time that its files are unreadable."""
    path = Path(path)
    bad = unloadable_entry(checkpoint)
    if bad is not None:
        raise CheckpointError(
            f"{path}: not written: {bad} is not a tensor or plain type, and checkpoints are read with "
            "torch.load(weights_only=True)"
        )
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


def _unpickler_detail(exc: pickle.UnpicklingError) -> str:
    """What torch's restricted unpickler objected to, without the advice around it (allowlist the
    global, or load with ``weights_only=False``: exactly what must not be done with a foreign file)."""
    text = str(exc)
    _, found, detail = text.partition("WeightsUnpickler error:")
    if not found:
        return " ".join(text.split())
    detail = detail.split("Check the documentation of torch.load", 1)[0].split(". Please", 1)[0]
    return " ".join(detail.split())


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").exists() else path / "checkpoint.pt"
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(exc)
        if "global" not in detail.lower():  # not a pickle stream at all (truncated, garbage)
            raise CheckpointError(f"{path}: not a readable checkpoint ({detail})") from None
        # the only way a pickle runs code is to name a callable (a global): the loader named one
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain types, which could run "
            f"code when unpickled (checkpoints are read with torch.load(weights_only=True)): {detail}"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(ckpt).__name__}, not a dict)")
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
