"""The served search before and after folding the item table, in one process.

    .venv/bin/python bench/bench_folded.py --run runs/quality/beauty_fair_s1     # a trained Beauty run
    .venv/bin/python bench/bench_folded.py                                       # synthetic, 12,101 x 128

Before: the network outputs ``code_scores [B, L, V]`` + ``query [B, D]`` and the search scores items
with ``ItemScorer`` (L gathers of the code scores + ``query @ vectors.T`` + bias). After: the network
outputs ``history [B, D]`` and the search scores with ``FoldedScorer`` (``history @ table.T`` + bias,
one product; the beam gets its code scores from the folded code heads). Both run through the same
search modes (exact, beam 200) on the same users, interleaved round by round so machine noise hits
both alike, one BLAS thread as in the service. Reported: milliseconds of search per user at batch 1
and 16 (the best of ``--repeats`` rounds: the least noisy estimate on a shared machine), and whether
the two rank identically (share of users with the same top 10).

With ``--run``, the run's network is folded (``export.fold``) and its outputs for random histories of
1..20 catalog items are used; without, a random catalog of ``--items`` items of width ``--dim`` (L=4
codes of 256) and random outputs, consistent between the two forms.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import print_rows  # noqa: E402  (bench/report.py: the script's folder is on sys.path)

from model.search.folded import CodeHeads, FoldedScorer  # noqa: E402
from model.search.item_scores import ItemScorer  # noqa: E402
from model.search.modes.registry import make_mode  # noqa: E402
from model.semantic_ids.trie import CodeTrie  # noqa: E402

K = 10


def from_run(run_dir: Path, users: int, seed: int):
    """(ItemScorer, FoldedScorer, trie, (code_scores, query), history, histories) of a trained run."""
    import torch

    from export.fold import fold_item_scores
    from export.verify import synthetic_histories
    from model.evaluate.ranking import item_scorer, load_run
    from model.search.inputs import histories_to_inputs

    run = load_run(run_dir)
    codes = np.asarray(run.table.codes, dtype=np.int64)
    histories = synthetic_histories(run.table.num_items, 20, users, seed)
    inputs = [torch.from_numpy(a) for a in histories_to_inputs(histories, codes, 20)]
    with torch.no_grad():
        out = run.model.forward(inputs[0], inputs[2], plain=True, items=inputs[1], last_only=True)
        h = out.history[:, -1].float().numpy()
        cs, q = (t.float().numpy() for t in run.model.next_item_scores(*inputs))
    return (
        item_scorer(run.model, run.table),
        fold_item_scores(run.model, codes),
        run.trie,
        (cs, q),
        h,
        histories,
    )


def synthetic(items: int, dim: int, users: int, seed: int):
    """The same, for a random catalog: an affine code head and ID query make both forms agree."""
    rng = np.random.default_rng(seed)
    levels, vocab = 4, 256
    flat = rng.choice(vocab ** (levels - 1), size=items, replace=False)
    codes = np.stack([(flat // vocab**i) % vocab for i in reversed(range(levels - 1))] + [flat * 0], axis=1)
    vectors = (rng.standard_normal((items, dim)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(items).astype(np.float32)
    head_w = (rng.standard_normal((dim, levels, vocab)) * 0.1).astype(np.float32)
    head_b = rng.standard_normal((levels, vocab)).astype(np.float32)
    h = rng.standard_normal((users, dim)).astype(np.float32)
    heads = CodeHeads(head_w, head_b)
    cs = heads.code_scores(h)  # the query is h itself (an identity ID query)
    code_part = head_w[:, np.arange(levels), codes].sum(-1).T  # [I, D]: sum_l W[:, l, code_l(i)]
    table = (code_part + vectors).astype(np.float32)
    folded_bias = (head_b[np.arange(levels), codes].sum(-1) + bias).astype(np.float32)
    histories = [rng.choice(items, 1 + u % 20, replace=False) for u in range(users)]
    return (
        ItemScorer(codes, vectors, bias),
        FoldedScorer(codes, table, folded_bias, heads),
        CodeTrie.from_codes(codes, vocab),
        (cs, h),
        h,
        histories,
    )


def best_ms_per_user(fns: dict[str, Callable[[slice], object]], users: int, batch: int, repeats: int):
    """The best-of-``repeats`` ms per user of every fn over batches of ``batch``, rounds interleaved."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for start in range(0, users, batch):
                fn(slice(start, min(start + batch, users)))
            best[name] = min(best[name], (time.perf_counter() - t0) / users * 1e3)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="a fair-train run directory (default: a synthetic catalog)")
    p.add_argument("--items", type=int, default=12_101, help="synthetic catalog size (default: Beauty's)")
    p.add_argument("--dim", type=int, default=128, help="synthetic model width (default 128)")
    p.add_argument("--users", type=int, default=256, help="users searched per round (default 256)")
    p.add_argument("--candidates", type=int, default=200, help="beam candidates (default 200)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    if args.run:
        scorer, folded, trie, outputs, h, histories = from_run(args.run, args.users, 0)
        where = f"{args.run} ({folded.num_items:,} items, D={folded.dim})"
    else:
        scorer, folded, trie, outputs, h, histories = synthetic(args.items, args.dim, args.users, 0)
        where = f"synthetic catalog of {folded.num_items:,} items, D={folded.dim}"
    rows = []
    with threadpool_limits(limits=1, user_api="blas"):
        for mode in (make_mode("exact"), make_mode("beam", {"candidates": args.candidates})):
            before = mode.search(scorer, trie, outputs, K, histories).items
            after = mode.search(folded, trie, (h,), K, histories).items
            row = {"search": mode.describe(), "same top-10": f"{(before == after).all(axis=1).mean():.1%}"}

            def run_before(r, mode=mode):
                mode.search(scorer, trie, tuple(o[r] for o in outputs), K, histories[r])

            def run_after(r, mode=mode):
                mode.search(folded, trie, (h[r],), K, histories[r])

            for batch in (1, 16):
                ms = best_ms_per_user(
                    {"before": run_before, "after": run_after}, args.users, batch, args.repeats
                )
                row[f"before ms/user @{batch}"] = round(ms["before"], 3)
                row[f"after ms/user @{batch}"] = round(ms["after"], 3)
                row[f"speed-up @{batch}"] = f"{ms['before'] / ms['after']:.2f}x"
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print_rows(
        rows, f"{where}; {args.users} users, k {K}, one BLAS thread, best of {args.repeats}", args.json
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
