"""Typed run configuration: ``[model]`` (-> ``FAIRConfig``) and ``[train]`` (-> ``TrainConfig``).

Configs are TOML files (``configs/fair_default.toml`` documents every key with a comment) plus
``--set section.key=value`` overrides; a file may start with ``extends = "base.toml"`` and list only
what differs. Every key and every value type is checked before any data is read or any step is taken,
and an error names the file (or ``--set``) and the key, because a typo that silently falls back to a
default wastes a whole training run.
"""

from __future__ import annotations

import json
import math
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from model.fair import FAIRConfig
from model.search.modes.registry import mode_names
from model.train.item_init import ITEM_ID_INITS

PERTURB_OPS = ("drop", "mask", "substitute")
SOFTMAX_FORMS = ("auto", "full", "sampled")
SPARSE_ID_FORMS = ("auto", "on", "off")
NEGATIVE_SAMPLERS = ("uniform", "popularity")
# keys that older runs saved under another name: a resumed run's config.json / checkpoint still loads
RENAMED_TRAIN_KEYS = {"item_loss": "softmax"}
# keys a run saved before they existed reads with the behaviour it trained with, not today's default: a
# sampled-softmax run checkpointed before the row-sparse ID table trained it dense
PREDATING_TRAIN_KEYS = {"sparse_item_ids": "off"}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says where and what."""


@dataclass
class TrainConfig:
    """Optimisation, objectives and evaluation schedule (see configs/fair_default.toml for the why)."""

    seed: int = 0
    max_history: int = 20  # items of context per training window / evaluated history
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    item_id_weight_decay: float = 0.0  # decoupled decay of the item-ID table (other embeddings: none)
    item_id_init: str = "random"  # "random" | "text": the ID table starts from the items' text embeddings
    item_id_init_std: float = 0.02  # overall std of the text start (0.02 = the random init's)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 200
    max_steps: int = 20000  # length of the cosine schedule; training stops here at the latest
    max_epochs: int = 200
    budget_minutes: float = 0.0  # > 0: train this long (optimisation time) with the cosine over time
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # > 0: validate, keep and export an exponential moving average of the weights
    bf16: bool = False  # bf16 autocast for forward/backward (weights and optimizer stay float32)
    # objectives
    # L_next: "full" softmax over the catalog | "sampled" (positive + shared sampled negatives, log-Q
    # corrected) | "auto": sampled when the catalog has at least sampled_softmax_min_items items
    softmax: str = "auto"
    sampled_softmax_min_items: int = 200_000
    num_negatives: int = 8192  # negatives drawn per batch, shared by its rows (also L_robust's candidates)
    negative_sampler: str = "popularity"  # proposal Q: "uniform" | "popularity" ((count + 1) ** alpha)
    negative_sampler_alpha: float = 0.75  # the popularity proposal's exponent
    # the item-ID table's update: "on" = row-sparse (sparse gradient of the rows a step touches, SparseAdam:
    # untouched rows and their moments stay as they are), "off" = dense (AdamW over every row every step),
    # "auto" = on with the sampled softmax (the full one touches every row anyway) unless the table decays
    sparse_item_ids: str = "auto"
    code_loss_weight: float = 0.0  # gamma: weight of the auxiliary per-level code cross-entropy
    robust: bool = True  # L_robust on/off
    alpha: float = 0.1  # weight of L_robust
    robust_attn_weight: float = 1.0  # weight of the attention-map term inside L_robust
    perturb_rate: float = 0.2  # share of real history items that get perturbed
    perturb_ops: list[str] = field(default_factory=lambda: list(PERTURB_OPS))
    mi: bool = True  # L_mi on/off
    beta: float = 0.1  # weight of L_mi
    tau: float = 0.1  # initial InfoNCE temperature (learned from there)
    # validation / early stopping
    eval_every: int = 500  # steps between validations (and checkpoints)
    eval_users: int = 3000  # validation users sampled once per run (0 = all)
    eval_search: str = "exact"  # "exact" (score the catalog) | "beam" (beam candidates, rescored)
    eval_beam: int = 20  # beam width = candidates rescored, when eval_search = "beam"
    patience: int = 6  # validations without NDCG@10 improvement before stopping
    log_every: int = 20

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> TrainConfig:
        """A ``train_config`` a checkpoint stored, its renamed keys (``RENAMED_TRAIN_KEYS``) read under
        their new names."""
        return cls(**{**PREDATING_TRAIN_KEYS, **{RENAMED_TRAIN_KEYS.get(k, k): v for k, v in d.items()}})

    def softmax_for(self, num_items: int) -> str:
        """The L_next form a catalog of ``num_items`` items trains with: "full" or "sampled".

        "auto" picks the full softmax below ``sampled_softmax_min_items`` (exact, and affordable: one
        [boundaries, items] product per step) and the sampled one from there (the full product, its
        softmax and its gradient grow with the catalog; at 1M items they are GBs per step)."""
        if self.softmax != "auto":
            return self.softmax
        return "sampled" if num_items >= self.sampled_softmax_min_items else "full"

    def sparse_ids_for(self, num_items: int) -> bool:
        """Whether a catalog of ``num_items`` items trains its item-ID table row-sparse.

        At 1M items AdamW's dense step reads and writes every row of the table, its gradient and two
        moment tables (2.2 s of a 6.9 s step on one thread, docs/model.md) while a batch touches ~3k rows;
        under DDP the dense gradient (494 MiB) is all-reduced whole. "auto" goes row-sparse exactly when
        the sampled softmax is on (the full softmax gives every row a gradient) and the table has no
        weight decay (SparseAdam has none)."""
        if self.sparse_item_ids != "auto":
            return self.sparse_item_ids == "on"
        return self.softmax_for(num_items) == "sampled" and self.item_id_weight_decay == 0

    def __post_init__(self) -> None:
        if self.sparse_item_ids not in SPARSE_ID_FORMS:
            raise ConfigError(
                f"train.sparse_item_ids must be one of {list(SPARSE_ID_FORMS)}, got {self.sparse_item_ids!r}"
            )
        if self.sparse_item_ids == "on" and self.item_id_weight_decay > 0:
            raise ConfigError(
                'train.sparse_item_ids = "on" cannot decay the item-ID table (SparseAdam has no weight decay): '
                'set train.item_id_weight_decay = 0 or train.sparse_item_ids = "off"'
            )
        if self.softmax not in SOFTMAX_FORMS:
            raise ConfigError(f"train.softmax must be one of {list(SOFTMAX_FORMS)}, got {self.softmax!r}")
        if self.negative_sampler not in NEGATIVE_SAMPLERS:
            raise ConfigError(
                f"train.negative_sampler must be one of {list(NEGATIVE_SAMPLERS)}, got {self.negative_sampler!r}"
            )
        if not (math.isfinite(self.negative_sampler_alpha) and 0.0 <= self.negative_sampler_alpha <= 1.0):
            raise ConfigError(
                f"train.negative_sampler_alpha must be in [0, 1] (0 = uniform over trained items), "
                f"got {self.negative_sampler_alpha}"
            )
        if self.sampled_softmax_min_items < 1:
            raise ConfigError(
                f"train.sampled_softmax_min_items must be >= 1, got {self.sampled_softmax_min_items}"
            )
        if self.item_id_init not in ITEM_ID_INITS:
            raise ConfigError(
                f"train.item_id_init must be one of {list(ITEM_ID_INITS)}, got {self.item_id_init!r}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not (math.isfinite(self.item_id_init_std) and self.item_id_init_std > 0):
            raise ConfigError(f"train.item_id_init_std must be > 0, got {self.item_id_init_std}")
        if self.eval_search not in mode_names():
            raise ConfigError(
                f"train.eval_search must be one of {list(mode_names())}, got {self.eval_search!r}"
            )
        if self.num_negatives < 1:
            raise ConfigError(f"train.num_negatives must be >= 1, got {self.num_negatives}")
        if self.code_loss_weight < 0:
            raise ConfigError(f"train.code_loss_weight must be >= 0, got {self.code_loss_weight}")
        bad = [op for op in self.perturb_ops if op not in PERTURB_OPS]
        if bad:
            raise ConfigError(f"train.perturb_ops: unknown {bad}, choose from {list(PERTURB_OPS)}")
        if not 0.0 <= self.perturb_rate <= 1.0:
            raise ConfigError(f"train.perturb_rate must be in [0, 1], got {self.perturb_rate}")
        if self.budget_minutes < 0:
            raise ConfigError(f"train.budget_minutes must be >= 0, got {self.budget_minutes}")
        if self.tau <= 0:
            raise ConfigError(f"train.tau must be > 0, got {self.tau}")
        for name in ("max_history", "batch_size", "max_steps", "eval_every", "eval_beam", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_beam < 10:
            raise ConfigError(f"train.eval_beam must be >= 10 (NDCG@10 needs 10 items), got {self.eval_beam}")


SECTIONS: dict[str, type] = {"model": FAIRConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    model: FAIRConfig = field(default_factory=FAIRConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.item_id_init == "text" and not self.model.item_ids:
            raise ConfigError('train.item_id_init = "text" needs an item-ID table (model.item_ids = true)')

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"model": asdict(self.model), "train": asdict(self.train)}

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list,):
        (inner,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else str(annotation)


def _merge(raw: dict[str, dict[str, Any]], data: dict[str, Any], where: str) -> None:
    """Check every key/type of ``data`` against the dataclasses and merge it into ``raw``."""
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section [{section}] (known: {sorted(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: [{section}] must be a table of key = value")
        types_ = typing.get_type_hints(SECTIONS[section])
        types_ = {f.name: types_[f.name] for f in fields(SECTIONS[section])}
        for key, value in values.items():
            if key not in types_ and section == "train" and key in RENAMED_TRAIN_KEYS:
                raise ConfigError(f"{where}: train.{key} is now train.{RENAMED_TRAIN_KEYS[key]}")
            if key not in types_:
                raise ConfigError(
                    f"{where}: unknown key {section}.{key} (known: {', '.join(sorted(types_))})"
                )
            if not _type_ok(value, types_[key]):
                raise ConfigError(
                    f"{where}: {section}.{key} must be {_type_name(types_[key])}, "
                    f"got {type(value).__name__} {value!r}"
                )
            raw[section][key] = float(value) if types_[key] is float else value


def parse_set(item: str) -> dict[str, Any]:
    """``section.key=value`` -> nested dict; the value is read as TOML (bare words become strings)."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.lr=1e-3")
    path, text = item.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return {section: {key: value}}


def _merge_file(raw: dict[str, dict[str, Any]], path: Path, chain: tuple[Path, ...] = ()) -> None:
    """Merge a TOML file (or a run dir's config.json) into ``raw``, its ``extends`` parent first.

    ``extends = "other.toml"`` (a path relative to the file) lets a dataset's config say only what
    differs from a shared one, so the two cannot drift apart; parents may extend further.
    """
    if not path.is_file():
        what = "is a directory, not a config file" if path.is_dir() else "no such config file"
        raise ConfigError(f"{path}: {what}" + (f" (extended by {chain[-1]})" if chain else ""))
    real = path.resolve()  # parents are found next to the real file, even through a symlink
    if real in chain:
        cycle = " -> ".join(str(p) for p in (*chain, real))
        raise ConfigError(f"{path}: extends cycle ({cycle})")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of sections, got {type(data).__name__}")
    if path.suffix == ".json" and isinstance(data.get("train"), dict):  # a run's own saved config
        data["train"] = {RENAMED_TRAIN_KEYS.get(k, k): v for k, v in data["train"].items()}
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str) or not parent:
            raise ConfigError(f"{path}: extends must be a non-empty path string, got {parent!r}")
        _merge_file(raw, real.parent / parent, (*chain, real))
    _merge(raw, data, str(path))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- TOML file (and what it extends) or a run dir's config.json <- ``--set`` overrides.

    Everything is type-checked; an error names the file (or ``--set``) and the key.
    """
    raw: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if path is not None:
        _merge_file(raw, Path(path))
        if Path(path).suffix == ".json":  # a run's config.json: keys it predates keep its behaviour
            raw["train"] = {**PREDATING_TRAIN_KEYS, **raw["train"]}
    for item in overrides or []:
        _merge(raw, parse_set(item), f"--set {item}")
    try:
        return RunConfig(model=FAIRConfig(**raw["model"]), train=TrainConfig(**raw["train"]))
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from exc
