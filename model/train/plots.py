"""PNG curves of a run (matplotlib, Agg backend: no display on training machines)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSS_KEYS = ("loss", "next", "robust", "mi")


def plot_curves(log_path: str | Path, out_path: str | Path) -> Path:
    """Training losses (left) and validation Recall/NDCG (right) from ``log.jsonl``."""
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    valid = [r for r in rows if r.get("kind") == "valid"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in LOSS_KEYS:
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            ax1.plot(*zip(*pts, strict=True), label=key)
    ax1.set_xlabel("step")
    ax1.set_title("training loss")
    if ax1.lines:  # a run stopped before its first log record has nothing to label
        ax1.legend()
    for key in ("recall@10", "ndcg@10", "recall@5", "ndcg@5"):
        pts = [(r["step"], r[key]) for r in valid if key in r]
        if pts:
            ax2.plot(*zip(*pts, strict=True), marker="o", label=key)
    ax2.set_xlabel("step")
    ax2.set_title("validation")
    if ax2.lines:
        ax2.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out_path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return out_path
