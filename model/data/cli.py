"""``fair-data``: make synthetic datasets, convert any supported format, print dataset statistics.

    fair-data synth --out DIR [--items N] [--users M] [--noise P] [--seed S] [--name NAME]
    fair-data stats DATA [--json]
    fair-data convert DATA --out DIR
    fair-data expand --data DATA --out DIR --items N [--users N] [--interactions N] [--seed S]

DATA is anything ``load_dataset`` accepts: a benchmark folder, a raw Amazon dump folder, a folder
with interactions + items tables, or a ``synthetic:items=...,users=...`` spec.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from model.data.benchmark import write_benchmark
from model.data.dataset import SequenceDataset
from model.data.expand import INTERACTIONS_PER_ITEM, expand_dataset
from model.data.loading import load_dataset
from model.data.synthetic import generate_synthetic


def dataset_stats(dataset: SequenceDataset) -> dict[str, object]:
    """The numbers ``fair-data stats`` prints (also handy for reports)."""
    lengths = np.fromiter((len(s) for s in dataset.sequences), dtype=np.int64, count=dataset.num_users)
    interactions = int(lengths.sum())
    seen = np.zeros(dataset.num_items, dtype=bool)
    for seq in dataset.sequences:
        seen[seq] = True
    return {
        "name": dataset.name,
        "users": dataset.num_users,
        "items": dataset.num_items,
        "items_with_interactions": int(seen.sum()),
        "interactions": interactions,
        "seq_len_min": int(lengths.min()) if len(lengths) else 0,
        "seq_len_mean": round(float(lengths.mean()), 3) if len(lengths) else 0.0,
        "seq_len_max": int(lengths.max()) if len(lengths) else 0,
        "density": round(interactions / max(1, dataset.num_users * dataset.num_items), 8),
        "item_fields": list(dataset.item_fields),
    }


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fair-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="generate a synthetic dataset in the benchmark format")
    synth.add_argument(
        "--out", required=True, help="output folder (created; gets <NAME>.txt.gz + items.tsv.gz)"
    )
    synth.add_argument("--items", type=_positive, default=1000, help="catalog size (default 1000)")
    synth.add_argument("--users", type=_positive, default=1000, help="number of users (default 1000)")
    synth.add_argument("--noise", type=_share, default=0.1, help="share of random noise clicks (default 0.1)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data (default 0)")
    synth.add_argument(
        "--name", default="Synthetic", help="dataset name = sequence file stem (default Synthetic)"
    )

    stats = sub.add_parser("stats", help="users, items, interactions and sequence lengths of a dataset")
    stats.add_argument("data", help="dataset folder or synthetic:... spec")
    stats.add_argument("--json", action="store_true", help="print one JSON object")

    convert = sub.add_parser("convert", help="write any supported dataset in the benchmark format")
    convert.add_argument("data", help="dataset folder or synthetic:... spec")
    convert.add_argument("--out", required=True, help="output folder")

    expand = sub.add_parser(
        "expand",
        help="scale a real dataset up (fractal / Kronecker expansion), keeping its degree shapes",
        description=(
            "Grow a real dataset to millions of items and users by a fractal (Kronecker) expansion "
            "(Belletti et al. 2019): every item gets K_i = ceil(items / source items) copies "
            "(variants: same text and attributes plus a 'variant' column), every user K_u copies "
            "(K_u = max(ceil(users / source users), ceil(interactions / source interactions))). "
            "An expanded user replays its source user's history in the same order and length; each "
            "event goes to one copy of the item, chosen by a seeded reduced matrix so that every copy "
            "of an item gets the same share of its events (item popularity scales by K_u / K_i). "
            "Counts are therefore rounded up to whole multiples of the source's. Same arguments, "
            "byte-identical output. See docs/data.md."
        ),
    )
    expand.add_argument(
        "--data", required=True, help="source dataset (e.g. ../shared/data/amazon/Beauty; any format)"
    )
    expand.add_argument(
        "--out",
        required=True,
        help="output benchmark folder (gets <NAME>.txt.gz, items.tsv.gz, expansion.json)",
    )
    expand.add_argument(
        "--items", type=_positive, default=1_000_000, help="at least this many items (default 1000000)"
    )
    expand.add_argument("--users", type=_positive, help="at least this many users (default: --items)")
    expand.add_argument(
        "--interactions",
        type=_positive,
        help=f"at least this many interactions (default: {INTERACTIONS_PER_ITEM} x --items)",
    )
    expand.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    expand.add_argument("--name", help="dataset name = sequence file stem (default <source name>Expanded)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "synth":
            start = time.perf_counter()
            big = args.items * 2 + args.users >= 500_000  # progress bars only where they help
            dataset = generate_synthetic(
                args.items, args.users, args.noise, args.seed, name=args.name, progress=big
            )
            out = write_benchmark(dataset, args.out, progress=big)
            s = dataset_stats(dataset)
            print(
                f"wrote {out}: {s['users']} users, {s['items']} items, {s['interactions']} interactions "
                f"in {time.perf_counter() - start:.1f}s"
            )
        elif args.command == "stats":
            s = dataset_stats(load_dataset(args.data))
            if args.json:
                print(json.dumps(s))
            else:
                for key, value in s.items():
                    print(f"{key:<24} {value}")
        elif args.command == "expand":
            start = time.perf_counter()
            report = expand_dataset(
                args.data,
                args.out,
                args.items,
                args.users,
                args.interactions,
                args.seed,
                name=args.name,
                progress=args.items >= 250_000,
            )
            print(
                f"wrote {args.out}: {report['users']} users, {report['items']} items, "
                f"{report['interactions']} interactions (x{report['user_factor']} users, "
                f"x{report['item_factor']} items) in {time.perf_counter() - start:.1f}s"
            )
        else:
            dataset = load_dataset(args.data)
            out = write_benchmark(dataset, args.out, progress=dataset.num_items >= 250_000)
            print(f"wrote {out}: {dataset.num_users} users, {dataset.num_items} items")
    except (ValueError, OSError) as exc:  # DataFormatError is a ValueError; messages name file:line
        print(f"fair-data: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
