"""``fair-train``: train FAIR on a dataset with a semantic-ID table; writes a run directory.

Everything that can be wrong with the inputs (config keys/types, data path, semantic-ID table,
table vs catalog) is checked before the first step, each with a one-line error and exit code 2.
Runs unchanged under ``torchrun --nproc_per_node N`` (DDP, gloo on CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from model.data.dataset import DataFormatError
from model.data.loading import load_dataset
from model.semantic_ids.table import SemanticIdError, SemanticIdTable
from model.train.checkpoint import CheckpointError
from model.train.config import ConfigError, load_config
from model.train.distributed import init_distributed, shutdown
from model.train.trainer import Trainer

EPILOG = """examples:
  fair-train --data ../shared/data/amazon/Beauty --sid runs/sid/beauty_rqvae.npz --out runs/beauty_fair \\
             --config configs/fair_default.toml --max-minutes 8
  fair-train ... --set model.attention=standard --set train.robust=false   # ablations
  fair-train --resume runs/beauty_fair --data ... --sid ...                  # continue exactly
  torchrun --nproc_per_node 2 -m model.train.cli --data ... --sid ... --out ...  # DDP
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fair-train",
        description="Train the FAIR generative recommender (focused attention + L_robust + L_mi).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data", required=True, help="dataset directory (benchmark/raw Amazon/interactions) or synthetic:..."
    )
    p.add_argument("--sid", required=True, help="semantic-ID table (.npz) built for exactly this catalog")
    p.add_argument("--out", help="run directory to create (required unless --resume)")
    p.add_argument("--config", help="TOML config (see configs/fair_default.toml); defaults when omitted")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key (repeatable)",
    )
    p.add_argument(
        "--max-minutes", type=float, help="stop (validate + checkpoint) after this much training time"
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where its checkpoint left it"
    )
    p.add_argument(
        "--stop-at-step", type=int, help="stop with a checkpoint after this global step (resumable chunks)"
    )
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument(
        "--no-final-eval", action="store_true", help="skip metrics.json (full valid/test ranking) at the end"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--item-embeddings",
        metavar="FILE.npy",
        help='item text embeddings [items, dim] for train.item_id_init = "text" and model.item_text '
        "(default: embed the catalog's texts with the bundled MiniLM, through the embedding cache fair-sid build fills)",
    )
    p.add_argument(
        "--cache-dir",
        help="embedding cache folder, as given to fair-sid build (default: fair-sid's default cache)",
    )
    return p


def check_same_encoder(table: SemanticIdTable, item_embeddings: str | None) -> None:
    """Without ``--item-embeddings`` fair-train embeds with the bundled MiniLM; the text start and the
    text part are meant to use the vectors the semantic IDs were built from, so refuse a table that
    another encoder (or a precomputed file) built."""
    from model.semantic_ids.encoders import DEFAULT_MODEL_ID

    encoder = table.meta.get("encoder")
    if item_embeddings is None and encoder not in (None, DEFAULT_MODEL_ID):
        raise ConfigError(
            f"the semantic-ID table was built from {encoder!r} embeddings, not the bundled MiniLM: "
            "give the same embeddings with --item-embeddings FILE.npy"
        )


def text_embeddings(path: str | None, dataset, progress: bool, cache_dir: str | None = None) -> np.ndarray:
    """The items' text embeddings: a given ``.npy``, else the bundled encoder through the cache (so
    after ``fair-sid build`` on the same catalog this reads a file instead of running MiniLM)."""
    from model.semantic_ids.encoders import CachedEncoder, SentenceTransformerEncoder, load_embeddings

    if path:
        return load_embeddings(path, num_items=dataset.num_items)
    encoder = SentenceTransformerEncoder(progress=progress)
    return CachedEncoder(encoder, cache_dir).encode(dataset.item_texts())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.out and not args.resume:
        print("fair-train: error: give --out RUN_DIR (new run) or --resume RUN_DIR", file=sys.stderr)
        return 2
    if args.out and args.resume and Path(args.out) != Path(args.resume):
        print("fair-train: error: --out and --resume name different directories", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"fair-train: error: --device {args.device} but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.resume or args.out)
    try:
        if args.resume:
            if args.config or args.set:
                raise ConfigError("--resume uses the run's own config.json; drop --config/--set")
            cfg = load_config(run_dir / "config.json")
        else:
            cfg = load_config(args.config, args.set)
        dataset = load_dataset(args.data, max_history=cfg.train.max_history)
        table = SemanticIdTable.load(args.sid)
        item_embeddings = None
        if (cfg.train.item_id_init == "text" or cfg.model.item_text) and not args.resume:
            table.check_catalog(dataset.item_ids, what=f"dataset {dataset.name!r}")  # before embedding
            check_same_encoder(table, args.item_embeddings)
            item_embeddings = text_embeddings(
                args.item_embeddings, dataset, progress=not args.quiet, cache_dir=args.cache_dir
            )
        dist = init_distributed(args.device)
        trainer = Trainer(cfg, dataset, table, run_dir, device=args.device, max_minutes=args.max_minutes,
                          resume=bool(args.resume), dist=dist, progress=not args.quiet,
                          item_embeddings=item_embeddings)  # fmt: skip
    except (ConfigError, SemanticIdError, CheckpointError, DataFormatError, FileNotFoundError,
            FileExistsError, ValueError) as exc:  # fmt: skip
        print(f"fair-train: error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = trainer.fit(stop_at_step=args.stop_at_step)
        if not args.no_final_eval and summary["reason"] != "stop_at_step":
            summary["metrics"] = trainer.final_metrics()
    finally:
        shutdown(dist)
    if dist.is_main:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
