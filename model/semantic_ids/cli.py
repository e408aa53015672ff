"""``fair-sid``: build a semantic-ID table for a dataset, or print statistics of one.

fair-sid build --data DIR --out FILE [--method rqvae|rqkmeans] [--levels 3] [--codebook-size 256]
               [--embeddings FILE.npy | --encoder MODEL_DIR] [--seed S] [--epochs N] [--cache-dir DIR]
fair-sid stats FILE [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.data.loading import load_dataset
from model.semantic_ids.collisions import table_stats
from model.semantic_ids.encoders import (
    CachedEncoder,
    EncoderError,
    PrecomputedEmbeddings,
    SentenceTransformerEncoder,
    TextEncoder,
    default_cache_dir,
)
from model.semantic_ids.table import SemanticIdError, SemanticIdTable


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fair-sid",
        description="Semantic IDs: embed item texts, quantize them into code tuples, add a collision code.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser(
        "build",
        help="build a semantic-ID table (.npz) for a dataset",
        description="Embed every item's text (or read --embeddings), quantize, and write a SemanticIdTable. "
        "Embeddings are cached by content hash, so rebuilding with another method or seed skips the "
        "embedding stage.",
    )
    b.add_argument(
        "--data",
        required=True,
        help="dataset: a folder (benchmark format, raw Amazon dump, interactions+items) or synthetic:items=N,...",
    )
    b.add_argument("--out", required=True, help="output table, e.g. runs/sid/beauty_rqvae.npz")
    b.add_argument(
        "--method",
        choices=("rqvae", "rqkmeans"),
        default="rqvae",
        help="quantizer (default: rqvae, as in TIGER)",
    )
    b.add_argument(
        "--levels", type=int, default=3, help="quantization levels before the collision code (default 3)"
    )
    b.add_argument("--codebook-size", type=int, default=256, help="codes per level (default 256)")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--embeddings", help=".npy of precomputed item embeddings [items, dim], row i = item i")
    src.add_argument(
        "--encoder", help="local sentence-transformers model directory (default: bundled all-MiniLM-L6-v2)"
    )
    b.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    b.add_argument("--epochs", type=int, help="RQ-VAE training epochs (default: RQVAEConfig.epochs, 50)")
    b.add_argument("--batch-size", type=int, default=64, help="text encoder batch size (default 64)")
    b.add_argument("--cache-dir", help=f"embedding cache folder (default {default_cache_dir()})")
    b.add_argument("--no-cache", action="store_true", help="always re-embed, never read or write the cache")
    b.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice; 1 is fastest on a busy shared machine)",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser(
        "expand",
        help="the table of a `fair-data expand` catalog from its source's table (no embedding)",
        description="Give every item of an expanded catalog (fair-data expand) its source item's code tuple "
        "followed by its variant number in base V (one more code for up to V copies). The copies of an item "
        "embed to nearly one vector, so `build` would put them in one collision group (past 256 copies' worth "
        "it cannot); this is the table that quantizer converges to, without embedding millions of texts.",
    )
    e.add_argument("--data", required=True, help="the expanded dataset folder (fair-data expand --out)")
    e.add_argument(
        "--source", required=True, help="the semantic-ID table of the dataset it was expanded from"
    )
    e.add_argument("--out", required=True, help="output table, e.g. runs/expand/beauty_1m_sid.npz")

    s = sub.add_parser(
        "stats", help="print statistics of a table", description="Size, uniqueness, utilization, collisions."
    )
    s.add_argument("table", help="a semantic-ID table (.npz)")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def _encoder(args: argparse.Namespace) -> TextEncoder:
    if args.embeddings:
        return PrecomputedEmbeddings(args.embeddings)
    enc = SentenceTransformerEncoder(args.encoder, batch_size=args.batch_size, progress=not args.quiet)
    return enc if args.no_cache else CachedEncoder(enc, args.cache_dir)


def _build(args: argparse.Namespace) -> int:
    # imported here: the quantizers need torch, `fair-sid stats` does not
    from model.semantic_ids.build import BuildConfig, build_semantic_ids

    options = {"epochs": args.epochs} if args.epochs is not None else {}
    cfg = BuildConfig(
        method=args.method, levels=args.levels, codebook_size=args.codebook_size, seed=args.seed, **options
    )
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise SemanticIdError(f"{out}: is a directory, expected a file name for the table")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    encoder = _encoder(args)  # before loading data: a bad --embeddings file fails fast
    dataset = load_dataset(args.data)
    table = build_semantic_ids(dataset, encoder, cfg, progress=not args.quiet)
    table.save(out)
    m = table.meta
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in m["seconds"].items())
    util = ", ".join(f"{u:.1%}" for u in m["utilization"])
    print(
        f"wrote {out}: {table.num_items} items, code length {table.code_length}, method {cfg.method}; "
        f"utilization per level [{util}]; {m['collisions']} items in collision groups "
        f"(largest {m['max_collision_group']}); {secs}"
    )
    return 0


def _expand(args: argparse.Namespace) -> int:
    from model.data.benchmark import ITEMS_FILE, read_items_table
    from model.data.expand import SOURCE_COLUMN, VARIANT_COLUMN
    from model.semantic_ids.expand import expand_semantic_ids

    items_path = Path(args.data) / ITEMS_FILE
    if not items_path.is_file():
        raise SemanticIdError(f"{args.data}: no {ITEMS_FILE} (expected a `fair-data expand` output folder)")
    item_ids, fields, meta = read_items_table(items_path)
    if SOURCE_COLUMN not in meta or VARIANT_COLUMN not in fields:
        raise SemanticIdError(
            f"{items_path}: no {SOURCE_COLUMN!r} and {VARIANT_COLUMN!r} columns: not a `fair-data expand` catalog"
        )
    try:
        variants = [int(v) for v in fields[VARIANT_COLUMN]]
    except ValueError as exc:
        raise SemanticIdError(
            f"{items_path}: a {VARIANT_COLUMN!r} value is not a whole number ({exc})"
        ) from None
    table = expand_semantic_ids(SemanticIdTable.load(args.source), item_ids, meta[SOURCE_COLUMN], variants)
    table.save(args.out)
    print(
        f"wrote {args.out}: {table.num_items} items, code length {table.code_length} "
        f"({table.code_length - table.meta['variant_digits']} from {args.source} + "
        f"{table.meta['variant_digits']} variant), {table.meta['source_items']} source items"
    )
    return 0


def _stats(args: argparse.Namespace) -> int:
    table = SemanticIdTable.load(args.table)
    stats = table_stats(table)
    if args.json:
        print(json.dumps(stats))
        return 0
    print(f"{args.table}")
    print(f"  items               {stats['items']}")
    print(f"  unique ids          {stats['unique_ids']}")
    print(f"  code length         {stats['code_length']}")
    print(f"  codebook size       {stats['codebook_size']}")
    print(f"  utilization         {', '.join(f'{u:.1%}' for u in stats['utilization'])}")
    print(f"  collisions          {stats['collisions']} items (largest group {stats['max_collision_group']})")
    if table.meta.get("method"):
        print(f"  built with          {table.meta['method']}, seconds {table.meta.get('seconds')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"build": _build, "expand": _expand, "stats": _stats}[args.command](args)
    except (SemanticIdError, EncoderError, ValueError, OSError) as exc:
        print(f"fair-sid: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
