"""One entry point for every CLI: ``load_dataset(path_or_spec)`` detects the format and loads it.

Accepted, so that ``--data`` takes any of them:

- a benchmark folder (``<Name>.txt.gz`` + ``items.tsv.gz``; what ``fair-data synth`` writes);
- a raw Amazon 2014 dump folder (``reviews_<Cat>_5.json.gz`` + ``meta_<Cat>.json.gz``);
- a generic folder (``interactions.{csv,parquet}`` + ``items.{csv,parquet}``);
- a synthetic spec, generated in memory: ``synthetic:items=1000,users=500,noise=0.1,seed=0`` (any
  keyword of ``generate_synthetic``; handy in tests and quick experiments).
"""

from __future__ import annotations

import inspect
from pathlib import Path

from model.data.amazon_raw import is_amazon_raw_dir, load_amazon_raw
from model.data.benchmark import is_benchmark_dir, load_benchmark
from model.data.dataset import DEFAULT_MAX_HISTORY, DataFormatError, SequenceDataset
from model.data.interactions import is_interactions_dir, load_interactions
from model.data.synthetic import generate_synthetic

SYNTHETIC_PREFIX = "synthetic:"
_SPEC_ALIASES = {"items": "num_items", "users": "num_users", "categories": "num_categories"}


def detect_format(path: str | Path) -> str:
    """``benchmark``, ``amazon_raw``, ``interactions`` or ``synthetic``; a clear error otherwise."""
    if isinstance(path, str) and path.startswith(SYNTHETIC_PREFIX):
        return "synthetic"
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise DataFormatError(path, None, "expected a dataset directory, got a file")
    if is_benchmark_dir(path):
        return "benchmark"
    if is_amazon_raw_dir(path):
        return "amazon_raw"
    if is_interactions_dir(path):
        return "interactions"
    raise DataFormatError(
        path,
        None,
        "unknown dataset layout: expected <Name>.txt.gz + items.tsv.gz, "
        "reviews_<Cat>_5.json.gz + meta_<Cat>.json.gz, or interactions.{csv,parquet} + items.{csv,parquet}",
    )


def parse_synthetic_spec(spec: str) -> dict[str, object]:
    """``synthetic:items=100,seed=3`` -> keyword arguments of ``generate_synthetic``."""
    params = inspect.signature(generate_synthetic).parameters
    kwargs: dict[str, object] = {}
    body = spec[len(SYNTHETIC_PREFIX) :].strip()
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = part.partition("=")
        key = _SPEC_ALIASES.get(key.strip(), key.strip())
        if not sep or key not in params or key in ("max_history", "progress"):
            allowed = sorted({*_SPEC_ALIASES, *params} - {"max_history", "progress", *_SPEC_ALIASES.values()})
            raise ValueError(f"bad synthetic spec part {part!r} in {spec!r}; keys: {', '.join(allowed)}")
        default = params[key].default
        try:
            kwargs[key] = (
                value.strip()
                if isinstance(default, str)
                else (float if isinstance(default, float) else int)(value)
            )
        except ValueError:
            raise ValueError(f"bad value for {key} in synthetic spec {spec!r}: {value!r}") from None
    return kwargs


def load_dataset(path_or_spec: str | Path, max_history: int = DEFAULT_MAX_HISTORY) -> SequenceDataset:
    """Load any supported dataset (see the module docstring) with the given history length."""
    fmt = detect_format(path_or_spec)
    if fmt == "synthetic":
        return generate_synthetic(**parse_synthetic_spec(str(path_or_spec)), max_history=max_history)
    loader = {"benchmark": load_benchmark, "amazon_raw": load_amazon_raw, "interactions": load_interactions}[
        fmt
    ]
    return loader(Path(path_or_spec), max_history=max_history)
