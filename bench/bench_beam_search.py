"""Benchmark: constrained beam search vs exact top-k on synthetic catalogs; prints a markdown table.

Catalog: ``--items`` random unique code tuples (``--levels`` codes in ``[0, --codebook-size)``), the
shape a 1M-item semantic-ID table has. Log-probs (``peaked_log_probs``): per user and level, standard
normal logits plus ``--peak`` on the codes of ``--interests`` random catalog items, then log-softmax:
a model that concentrates on a few items but not on one, so the beam has real choices to make.

    .venv/bin/python bench/bench_beam_search.py --items 12000 1000000

Other code (e.g. other benchmarks) can import ``synthetic_codes`` and ``trie_build_seconds``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from model.search.beam import constrained_beam_search, exact_topk  # noqa: E402
from model.semantic_ids.trie import CodeTrie  # noqa: E402


def synthetic_codes(num_items: int, levels: int = 4, codebook_size: int = 256, seed: int = 0) -> np.ndarray:
    """``[num_items, levels]`` int64 unique random code tuples (uniform over the code space)."""
    space = codebook_size**levels
    if num_items > space:
        raise ValueError(f"{num_items} items do not fit in {codebook_size}^{levels} code tuples")
    rng = np.random.default_rng(seed)
    keys = np.zeros(0, dtype=np.int64)
    while len(keys) < num_items:  # redraw until enough distinct tuples (collisions are rare)
        draw = rng.integers(0, space, size=num_items - len(keys) + num_items // 100 + 16, dtype=np.int64)
        keys = np.unique(np.concatenate([keys, draw]))
    keys = rng.permutation(keys)[:num_items]
    return np.stack(np.unravel_index(keys, (codebook_size,) * levels), axis=1).astype(np.int64)


def trie_build_seconds(codes: np.ndarray, codebook_size: int, repeats: int = 3) -> tuple[float, CodeTrie]:
    """Median seconds of ``CodeTrie.from_codes(codes)`` over ``repeats`` runs, and the trie."""
    times, trie = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        trie = CodeTrie.from_codes(codes, codebook_size)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), trie


def peaked_log_probs(
    codes: np.ndarray, codebook_size: int, batch: int, interests: int, peak: float, seed: int
) -> np.ndarray:
    """float32 ``[batch, L, V]`` log-softmax of N(0, 1) logits + ``peak`` on the codes of a few items."""
    rng = np.random.default_rng(seed)
    levels = codes.shape[1]
    logits = rng.standard_normal((batch, levels, codebook_size))
    liked = rng.integers(0, len(codes), size=(batch, interests))
    for level in range(levels):
        np.put_along_axis(logits[:, level], codes[liked, level], peak, axis=1)
    logits -= logits.max(axis=2, keepdims=True)
    return (logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))).astype(np.float32)


def median_seconds(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (edge-key caches, allocator)
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def recall(beam_items: np.ndarray, exact_items: np.ndarray) -> float:
    """Mean share of each user's exact top-k (real items) that the beam also returned."""
    hits = total = 0
    for got, want in zip(beam_items, exact_items, strict=True):
        want = want[want >= 0]
        hits += len(np.intersect1d(got[got >= 0], want))
        total += len(want)
    return hits / max(total, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[12_000, 1_000_000], help="catalog sizes")
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="users per batch")
    parser.add_argument("--beam", type=int, nargs="+", default=[20], help="beam widths (one row each)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument(
        "--exclude",
        type=int,
        default=20,
        help="extra rows where each user's N best items are excluded as seen",
    )
    parser.add_argument("--interests", type=int, default=3, help="items each user's log-probs peak on")
    parser.add_argument("--peak", type=float, default=4.0, help="logit boost on the interest items' codes")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.items) < 1 or args.batch < 1 or min(args.beam) < 1 or args.k < 1 or args.repeats < 1:
        parser.error("--items, --batch, --beam, -k and --repeats must be >= 1")

    print(f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}")
    print(
        f"batch {args.batch}, k {args.k}, L {args.levels}, V {args.codebook_size}, "
        f"interests {args.interests}, peak {args.peak}, median of {args.repeats}\n"
    )
    print(
        "| items | beam | exclude/user | trie build s | trie MB | beam ms/batch | exact ms/batch "
        f"| recall@{args.k} of exact |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for num_items in args.items:
        codes = synthetic_codes(num_items, args.levels, args.codebook_size, args.seed)
        build_s, trie = trie_build_seconds(codes, args.codebook_size)
        lp = peaked_log_probs(codes, args.codebook_size, args.batch, args.interests, args.peak, args.seed + 1)
        for n_excl in sorted({0, args.exclude}):
            # worst case for crowding out: each user has already seen its n_excl best-scored items
            exclude = list(exact_topk(lp, trie, n_excl).items) if n_excl else None
            exact_s, exact = median_seconds(partial(exact_topk, lp, trie, args.k, exclude), args.repeats)
            for width in args.beam:
                beam_s, beam = median_seconds(
                    partial(constrained_beam_search, lp, trie, width, args.k, exclude), args.repeats
                )
                print(
                    f"| {num_items:,} | {width} | {n_excl} | {build_s:.3f} | {trie.nbytes() / 2**20:.1f} "
                    f"| {beam_s * 1e3:.1f} | {exact_s * 1e3:.1f} | {recall(beam.items, exact.items):.4f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
