"""Degree distributions of a dataset and of its fractal expansion, side by side (log-log CCDF).

``fair-data expand`` claims to keep the shapes of item popularity and user history length. This
draws both for the source and the expansion, each degree divided by its dataset's mean so the
expansion's scale factor (``K_u / K_i`` for items, 1 for users) drops out and the curves can be
compared directly: matching curves mean a kept shape.

    .venv/bin/python bench/expand_degrees.py --data ../shared/data/amazon/Beauty \\
        --expanded runs/expand/beauty_1m --out docs/img/expand_degrees.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from model.data.dataset import SequenceDataset  # noqa: E402
from model.data.loading import load_dataset  # noqa: E402


def degrees(dataset: SequenceDataset) -> tuple[np.ndarray, np.ndarray]:
    """(interactions per item, history length per user) over the whole sequences."""
    lengths = np.fromiter((len(s) for s in dataset.sequences), dtype=np.int64, count=dataset.num_users)
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in dataset.sequences])
    return np.bincount(flat, minlength=dataset.num_items), lengths


def ccdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values and the share of entries >= each of them (the complementary CDF)."""
    uniq, counts = np.unique(values, return_counts=True)
    at_least = np.cumsum(counts[::-1])[::-1] / len(values)
    return uniq, at_least


def plot(source: SequenceDataset, expanded: SequenceDataset, out: Path) -> dict[str, float]:
    """Write the two-panel figure; returns the summary numbers printed next to it."""
    src_items, src_users = degrees(source)
    exp_items, exp_users = degrees(expanded)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (
        ("item popularity (interactions per item)", src_items, exp_items),
        ("user history length", src_users, exp_users),
    )
    summary: dict[str, float] = {}
    for ax, (title, src, exp) in zip(axes, panels, strict=True):
        key = "items" if "item" in title else "users"
        for values, label, style in (
            (src, f"{source.name}: {len(src):,} {key}", dict(color="C0", lw=2.5)),
            (exp, f"{expanded.name}: {len(exp):,} {key}", dict(color="C3", lw=1.2, ls="--")),
        ):
            x, y = ccdf(values[values > 0])
            ax.step(x / values.mean(), y, where="post", label=label, **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("degree / mean degree")
        ax.set_ylabel("share with at least this degree (CCDF)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
        summary[f"{key}_mean_source"] = float(src.mean())
        summary[f"{key}_mean_expanded"] = float(exp.mean())
    fig.suptitle("Fractal expansion keeps the degree shapes (each curve normalised by its mean)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="the source dataset")
    parser.add_argument("--expanded", required=True, help="the folder fair-data expand wrote")
    parser.add_argument("--out", default="docs/img/expand_degrees.png", help="PNG to write")
    args = parser.parse_args(argv)
    summary = plot(load_dataset(args.data), load_dataset(args.expanded), Path(args.out))
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
