"""The exact search's two kernels, reference form against fast form, in one process.

    .venv/bin/python bench/bench_exact_kernels.py                      # 12,101 and 100,000 items
    .venv/bin/python bench/bench_exact_kernels.py --items 12101 --batch-sizes 16

Exact search = item scores of the whole catalog (``ItemScorer.all_scores``: L gathers + a
``[B, D] x [D, I]`` product) then the best k (``top_k``). For each catalog size and batch size this
times, on the same random inputs and interleaved so machine noise hits both alike:

* the product against the transposed view of the ``[I, D]`` item table (the reference form, what
  ``all_scores`` did before) and against the contiguous ``[D, I]`` copy it now keeps;
* ``top_k_reference`` (one selection over each row) and ``top_k`` (block pre-selection);
* the whole exact search, before and after.

Milliseconds per batch, the best of ``--repeats`` rounds (the minimum is the least noisy estimate of
what the code costs on a shared machine). Prints a markdown table and, with ``--json``, writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.search.scoring import ItemScorer, top_k, top_k_reference  # noqa: E402


def _best_ms(fn: Callable[[], object], inner: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best * 1e3


def _reference_scores(scorer: ItemScorer, cs: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``all_scores`` as it was: gathers, then the product against the transposed view."""
    batch, levels, vocab = cs.shape
    flat = cs.reshape(batch, levels * vocab)
    scores = np.take(flat, scorer.codes[:, 0], axis=1)
    for level in range(1, levels):
        scores += np.take(flat, scorer.codes[:, level] + level * vocab, axis=1)
    scores += q @ scorer.vectors.T
    scores += scorer.bias
    return scores


def measure(items: int, batch: int, dim: int, k: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    levels, vocab = 4, 256
    scorer = ItemScorer(
        codes=rng.integers(0, vocab, (items, levels)),
        vectors=rng.standard_normal((items, dim)).astype(np.float32),
        bias=rng.standard_normal(items).astype(np.float32),
    )
    cs = rng.standard_normal((batch, levels, vocab)).astype(np.float32)
    q = rng.standard_normal((batch, dim)).astype(np.float32)
    scores = scorer.all_scores(cs, q)
    np.testing.assert_allclose(scores, _reference_scores(scorer, cs, q), rtol=1e-4, atol=1e-3)
    assert (top_k(scores, k).items == top_k_reference(scores, k).items).all()
    inner = max(1, int(2e6 // (items * batch)))
    timings = {
        "product, transposed view": lambda: q @ scorer.vectors.T,
        "product, contiguous [D, I]": lambda: q @ scorer._vectors_t,
        "top_k_reference": lambda: top_k_reference(scores, k),
        "top_k (blocks)": lambda: top_k(scores, k),
        "exact search, before": lambda: top_k_reference(_reference_scores(scorer, cs, q), k),
        "exact search, now": lambda: top_k(scorer.all_scores(cs, q), k),
    }
    out = {name: 0.0 for name in timings}
    for _ in range(3):  # interleave the variants so load changes hit all of them
        for name, fn in timings.items():
            ms = _best_ms(fn, inner, max(1, repeats // 3))
            out[name] = ms if out[name] == 0.0 else min(out[name], ms)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", default="12101,100000", help="catalog sizes, comma-separated")
    p.add_argument("--batch-sizes", default="1,16,32", help="batch sizes, comma-separated")
    p.add_argument("--dim", type=int, default=128, help="item vector width D (the shipped d_model)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=9, help="timing rounds per variant (best kept)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    rows = []
    for items in (int(x) for x in args.items.split(",")):
        for batch in (int(x) for x in args.batch_sizes.split(",")):
            rows.append(
                {"items": items, "batch": batch, **measure(items, batch, args.dim, args.k, args.repeats)}
            )
    names = [k for k in rows[0] if k not in ("items", "batch")]
    print("| items | batch | " + " | ".join(names) + " |")
    print("|---:|---:|" + "---:|" * len(names))
    for r in rows:
        print(f"| {r['items']:,} | {r['batch']} | " + " | ".join(f"{r[n]:.3f}" for n in names) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
