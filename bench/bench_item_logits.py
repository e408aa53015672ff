"""Training's item-score product, reference form against folded form, in one process.

    .venv/bin/python bench/bench_item_logits.py                        # configs/amazon.toml's model
    .venv/bin/python bench/bench_item_logits.py --rows 1000 --candidates 9000 12101 --json out.json

``FAIR.item_logits`` scores P history rows against C items. The reference form multiplies the stacked
per-level queries [P, L*D + D] with the stacked item vectors [C, L*D + D]; the folded form first folds the
items through ``query_vectors``' matrix ([C, D]) and multiplies [P, D] x [D, C] (docs/model.md, "L_next").
Training calls it with P ~ 1,000 boundaries per batch of 128 and C = the catalog (full softmax) or the
batch's targets + ``num_negatives`` (sampled softmax, and L_robust's candidate set).

For each C this times forward + backward of ``(scores * weights).sum()`` (a loss that reads every score)
for both forms on the same random inputs, interleaved so machine noise hits both alike, and reports the
best of ``--repeats`` rounds in milliseconds (the minimum is the least noisy estimate on a shared machine)
and the largest absolute difference of the scores. Prints a markdown table; ``--json`` writes it too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.fair import FAIR  # noqa: E402
from model.train.config import load_config  # noqa: E402


def _step(model: FAIR, history: torch.Tensor, codes: torch.Tensor, items: torch.Tensor,
          weights: torch.Tensor, folded: bool) -> torch.Tensor:  # fmt: skip
    model.zero_grad(set_to_none=True)
    h = history.detach().requires_grad_()
    scores = model.item_logits(h, codes, items, folded=folded)
    (scores * weights).sum().backward()
    return scores.detach()


def measure(model: FAIR, rows: int, candidates: int, repeats: int, seed: int) -> dict:
    """Best-of-``repeats`` ms for one forward + backward of each form, and their largest score difference."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    codes = torch.randint(0, cfg.codebook_size, (candidates, cfg.num_levels), generator=g)
    items = torch.randint(0, cfg.num_items, (candidates,), generator=g)
    history = torch.randn(rows, cfg.d_model, generator=g)
    weights = torch.randn(rows, candidates, generator=g)
    best = {False: float("inf"), True: float("inf")}
    outs = {}
    for folded in (False, True):  # warm-up, and the scores to compare
        outs[folded] = _step(model, history, codes, items, weights, folded)
    for _ in range(repeats):
        for folded in (False, True):
            t0 = time.perf_counter()
            _step(model, history, codes, items, weights, folded)
            best[folded] = min(best[folded], time.perf_counter() - t0)
    return {
        "rows": rows, "candidates": candidates, "d_model": cfg.d_model, "levels": cfg.num_levels,
        "reference_ms": round(best[False] * 1e3, 2), "folded_ms": round(best[True] * 1e3, 2),
        "speedup": round(best[False] / best[True], 2),
        "max_abs_diff": float((outs[True] - outs[False]).abs().max()),
        "threads": torch.get_num_threads(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", default=str(ROOT / "configs/amazon.toml"), help="the run config whose [model] to use"
    )
    p.add_argument("--rows", type=int, default=1000, help="history rows P (boundaries of a batch)")
    p.add_argument("--candidates", type=int, nargs="+", default=[9000, 12101],
                   help="item counts C: e.g. 8,192 negatives + ~800 targets, Beauty's catalog")  # fmt: skip
    p.add_argument(
        "--items",
        type=int,
        default=12_101,
        help="the ID table's size (candidates index into it; a dense table's gradient is part of the time)",
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = load_config(args.config).model
    cfg.num_items = args.items
    model = FAIR(cfg)
    rows = [measure(model, args.rows, c, args.repeats, args.seed) for c in args.candidates]
    print(f"machine: {os.cpu_count()} cores, torch threads {args.threads}; P = {args.rows}, D = {cfg.d_model}, "
          f"L = {cfg.num_levels}; forward + backward, best of {args.repeats}")  # fmt: skip
    print("| candidates | reference ms | folded ms | speedup | max abs diff |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['candidates']:,} | {r['reference_ms']} | {r['folded_ms']} | {r['speedup']}x | {r['max_abs_diff']:.1e} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
