"""Items added without retraining, measured on Amazon Beauty with items held out of training (issue 21.4).

    .venv/bin/python bench/new_items_holdout.py prepare  --data ../shared/data/amazon/Beauty --work runs/newitems
    .venv/bin/fair-train --data runs/newitems/data --sid runs/newitems/sid.npz --out runs/newitems/run \\
        --config configs/amazon.toml --item-embeddings runs/newitems/emb.npy --threads 1 \\
        --set train.softmax=sampled --set train.num_negatives=2048 --set train.max_steps=800 \\
        --set train.eval_every=800                            # (the command `prepare` prints)
    .venv/bin/fair-export --run runs/newitems/run --data runs/newitems/data --out runs/newitems/bundles \\
        --name heldout --search exact --item-encoder
    .venv/bin/fair-export --run runs/sampled/beauty_fair --data ../shared/data/amazon/Beauty \\
        --out runs/newitems/bundles --name full --search exact
    .venv/bin/python bench/new_items_holdout.py measure --work runs/newitems --full-run runs/sampled/beauty_fair

``prepare`` picks ``--held-out`` items (seeded) among the items that are some user's test target (the
last item of a sequence), and writes the catalog without them: every interaction with them removed from
every sequence (train, valid and test of every user), their rows removed from the catalog. The
semantic IDs of that catalog are built as ``fair-sid build`` builds them (RQ-VAE, the bundled MiniLM's
embeddings of the item texts, read from fair-sid's embedding cache when present), so the quantizer
never saw the held-out items either. Training and export are the ordinary commands above.

``measure`` then serves the held-out model as the service does (service.engine + service.new_items:
ONNX Runtime, no torch): it adds the held-out items through the new-item path (their texts -> the
bundle's ONNX MiniLM -> its quantizer -> semantic ID and cold rows), and for every user whose test
target is a held-out item ranks the whole catalog (exact, seen items excluded, the user's real history
before the target, held-out items in it included) and reports Recall@10 / NDCG@10 of the target against
(a) random ranking (exact expectation per user), (b) the same items with their trained rows: the model
``--full-run`` trained on all of Beauty, exported as bundle ``full``, ranking the same users, and
(c) that full model with the held-out items' rows replaced by cold rows (code part only, what the
new-item path gives them), which separates "no ID row" from "never trained on them". ``--json`` writes
the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.data.benchmark import write_benchmark  # noqa: E402
from model.data.dataset import SequenceDataset  # noqa: E402
from model.data.loading import load_dataset  # noqa: E402

K = 10
MAX_HISTORY = 20


def _held_out(dataset: SequenceDataset, count: int, seed: int) -> np.ndarray:
    """``count`` distinct item indices drawn among the items that are some user's test target."""
    targets = np.unique([int(s[-1]) for s in dataset.sequences if len(s) >= 3])
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(targets, size=count, replace=False))


def prepare(args: argparse.Namespace) -> int:
    from model.semantic_ids.build import BuildConfig, build_table
    from model.semantic_ids.encoders import DEFAULT_MODEL_ID, CachedEncoder, SentenceTransformerEncoder

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    full = load_dataset(args.data, max_history=MAX_HISTORY)
    held = _held_out(full, args.held_out, args.seed)
    keep = np.setdiff1d(np.arange(full.num_items), held)
    new_index = np.full(full.num_items, -1, dtype=np.int64)
    new_index[keep] = np.arange(len(keep))
    sequences = [new_index[s][new_index[s] >= 0] for s in full.sequences]
    reduced = SequenceDataset(
        name=full.name,
        item_ids=[full.item_ids[i] for i in keep],
        item_fields={k: [v[i] for i in keep] for k, v in full.item_fields.items()},
        user_ids=list(full.user_ids),
        sequences=sequences,
        max_history=MAX_HISTORY,
        item_meta={k: [v[i] for i in keep] for k, v in full.item_meta.items()},
    )
    write_benchmark(reduced, work / "data")
    t = time.perf_counter()
    embeddings = CachedEncoder(SentenceTransformerEncoder(progress=False)).encode(full.item_texts())
    embed_s = time.perf_counter() - t
    np.save(work / "emb.npy", embeddings[keep])
    meta = {"dataset": f"{full.name} without {len(held)} held-out items", "encoder": DEFAULT_MODEL_ID,
            "seconds": {"embed": embed_s}}  # fmt: skip
    table = build_table(
        embeddings[keep], reduced.item_ids, BuildConfig(method="rqvae"), progress=False, meta=meta
    )
    table.save(work / "sid.npz")
    texts = full.item_texts()
    info = {
        "data": str(args.data),
        "seed": args.seed,
        "held_out": [{"item_id": full.item_ids[i], "text": texts[i]} for i in held],
        "test_users": int(sum(1 for s in full.sequences if len(s) >= 3 and s[-1] in set(held.tolist()))),
        "removed_interactions": int(sum(len(s) for s in full.sequences) - sum(len(s) for s in sequences)),
    }
    (work / "held_out.json").write_text(json.dumps(info, indent=1))
    print(
        f"held out {len(held)} items ({info['removed_interactions']} interactions removed, "
        f"{info['test_users']} test users have one as their target); wrote {work}/data, sid.npz, emb.npy\n"
        "next:\n"
        f"  .venv/bin/fair-train --data {work}/data --sid {work}/sid.npz --out {work}/run "
        f"--config configs/amazon.toml --item-embeddings {work}/emb.npy --threads 1 "
        "--set train.softmax=sampled --set train.num_negatives=2048 --set train.max_steps=800 "
        "--set train.eval_every=800"
    )
    return 0


def _served_ranks(engine, histories: list[np.ndarray], targets: np.ndarray) -> tuple[np.ndarray, float]:
    """Per user: the target's rank in the served top-10 (``engine.search``, seen items excluded; 10
    when absent), and the seconds per user of forward + search."""
    ranks = np.full(len(targets), K, dtype=np.int64)
    start = time.perf_counter()
    for lo in range(0, len(histories), 64):
        batch = histories[lo : lo + 64]
        items, _ = engine.search(engine.forward(batch), K, K, [np.unique(h) for h in batch])
        for j, row in enumerate(items):
            hit = np.flatnonzero(row == targets[lo + j])
            if hit.size:
                ranks[lo + j] = hit[0]
    return ranks, (time.perf_counter() - start) / max(len(histories), 1)


def _ranks(engine, histories, targets, table: np.ndarray, bias: np.ndarray, among=None) -> np.ndarray:
    """Per user: the target's rank (0 = first) by the folded score ``table``/``bias`` over the whole
    catalog (or the items ``among``), seen items excluded."""
    out = np.empty(len(targets), dtype=np.int64)
    for lo in range(0, len(histories), 64):
        batch = histories[lo : lo + 64]
        (h,) = engine.forward(batch).outputs
        scores = h @ table.T + bias
        for j, hist in enumerate(batch):
            scores[j, np.unique(hist)] = -np.inf
        t = scores[np.arange(len(batch)), targets[lo : lo + 64]]
        pool = scores if among is None else scores[:, among]
        out[lo : lo + 64] = (pool > t[:, None]).sum(1)
    return out


def _report(ranks: np.ndarray) -> dict:
    hit = ranks < K
    return {
        "recall@10": round(float(hit.mean()), 4),
        "ndcg@10": round(float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean()), 4),
        "recall@100": round(float((ranks < 100).mean()), 4),
        "recall@1000": round(float((ranks < 1000).mean()), 4),
        "median_rank": int(np.median(ranks)) + 1,
    }


def _random(num_items: int, histories: list[np.ndarray]) -> dict:
    """Exact expectation of a uniformly random ranking of the unseen items."""
    unseen = np.array([num_items - len(np.unique(h)) for h in histories], dtype=np.float64)
    disc = (1.0 / np.log2(np.arange(K) + 2.0)).sum()
    return {
        "recall@10": round(float(np.mean(K / unseen)), 5),
        "ndcg@10": round(float(np.mean(disc / unseen)), 5),
        "recall@100": round(float(np.mean(100 / unseen)), 4),
        "recall@1000": round(float(np.mean(1000 / unseen)), 4),
        "median_rank": int(np.median(unseen) / 2),
    }


def _neighbour_parts(base_codes, id_table, id_bias, id_inputs, codes) -> tuple[np.ndarray, ...]:
    """For each new item: the mean ID part (folded row and bias) and input row of the catalog items
    sharing its longest semantic-ID prefix (3 codes, else 2, else 1): an estimate the served path does
    NOT use (it gives no ID part, as to a cold catalog item); measured here to size what it would give."""
    table = np.zeros((len(codes), id_table.shape[1]), dtype=np.float32)
    bias = np.zeros(len(codes), dtype=np.float32)
    inputs = np.zeros((len(codes), id_inputs.shape[1]), dtype=np.float32)
    for j, c in enumerate(codes):
        for length in (3, 2, 1):
            same = np.all(base_codes[:, :length] == c[:length], axis=1)
            if same.any():
                table[j], bias[j], inputs[j] = (
                    id_table[same].mean(0),
                    id_bias[same].mean(),
                    id_inputs[same].mean(0),
                )
                break
    return table, bias, inputs


def measure(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from export.item_encoder import new_item_parts
    from model.train.checkpoint import load_model
    from service.engine import load_engine, single_threaded_blas
    from service.new_item_encoder import ItemEncoder, PrefixIndex, assign_codes
    from service.new_items import Catalog

    single_threaded_blas()
    work = Path(args.work)
    info = json.loads((work / "held_out.json").read_text())
    full = load_dataset(info["data"], max_history=MAX_HISTORY)
    held_ids = [h["item_id"] for h in info["held_out"]]
    held_set = set(held_ids)
    users = [u for u, s in enumerate(full.sequences) if len(s) >= 3 and full.item_ids[s[-1]] in held_set]
    result: dict = {"held_out_items": len(held_ids), "users": len(users)}

    # (a) the held-out model, the held-out items added through the new-item path
    engine = load_engine(work / "bundles" / "heldout", providers=["CPUExecutionProvider"])
    b = engine.bundle
    encoder = ItemEncoder.load(b)
    # the service path against the table on catalog items: tokenizer + ONNX MiniLM + numpy RQ-VAE
    texts = load_dataset(work / "data", max_history=MAX_HISTORY).item_texts()
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(texts), size=min(args.parity_items, len(texts)), replace=False))
    prefix = encoder.prefixes(encoder.embed([texts[i] for i in sample]))
    agreement = float(np.mean(np.all(prefix == b.table.codes[sample, :-1], axis=1)))
    result["catalog_codes_reproduced"] = {"items": len(sample), "share": round(agreement, 4)}
    t = time.perf_counter()
    embeddings = encoder.embed([h["text"] for h in info["held_out"]])
    embed_s = time.perf_counter() - t
    t = time.perf_counter()
    codes, ok = assign_codes(encoder.prefixes(embeddings), PrefixIndex(b.table.codes, b.table.codebook_size))
    rows = encoder.rows(codes, embeddings)
    extended = Catalog(engine).extend(held_ids, rows)
    rows_s = time.perf_counter() - t
    result["add"] = {
        "embed_ms_per_item": round(1000 * embed_s / len(held_ids), 2),
        "rows_and_extend_ms": round(1000 * rows_s, 1),
        "all_codes_assigned": bool(ok.all()),
        "collision_codes_above_0": int((codes[:, -1] > 0).sum()),
        "encoder_check": b.manifest["item_encoder"]["check"],
    }
    index = extended.item_index
    n = extended.catalog.base_items
    histories = [
        np.asarray([index[full.item_ids[i]] for i in full.sequences[u][:-1]][-MAX_HISTORY:], dtype=np.int64)
        for u in users
    ]
    targets = np.asarray([index[full.item_ids[full.sequences[u][-1]]] for u in users], dtype=np.int64)
    served, per_user = _served_ranks(extended, histories, targets)
    scorer = extended.bundle.scorer
    ranks = _ranks(extended, histories, targets, scorer.table, scorer.bias)
    assert np.array_equal(np.minimum(ranks, K), served), "served top-10 differs from the full ranking"
    in_top = 0
    for lo in range(0, len(histories), 64):
        batch = histories[lo : lo + 64]
        items, _ = extended.search(extended.forward(batch), K, K, [np.unique(h) for h in batch])
        in_top += int((items >= n).sum())
    result["random"] = _random(extended.bundle.table.num_items, histories)
    result["new_item_path"] = _report(ranks) | {
        "ms_per_user": round(1000 * per_user, 2),
        "new_items_per_top10": round(in_top / len(users), 3),
    }
    among = np.arange(n, n + len(held_ids))
    within = _ranks(extended, histories, targets, scorer.table, scorer.bias, among=among)
    result["new_item_path_among_new_items_only"] = {
        "recall@10": round(float((within < K).mean()), 4),
        "random_recall@10": round(K / len(held_ids), 4),
        "median_rank": int(np.median(within)) + 1,
    }
    # (a') the same items with the mean ID part of their semantic-ID neighbours (not what is served)
    code_part = encoder.code_table[np.arange(b.table.code_length), b.table.codes].astype(np.float64).sum(1)
    code_bias = encoder.code_bias[np.arange(b.table.code_length), b.table.codes].astype(np.float64).sum(1)
    t_n, b_n, i_n = _neighbour_parts(
        b.table.codes, b.scorer.table - code_part, b.scorer.bias - code_bias, b.item_inputs, codes
    )
    table2, bias2 = scorer.table.copy(), scorer.bias.copy()
    table2[n:] += t_n
    bias2[n:] += b_n
    inputs2 = extended.bundle.item_inputs.copy()
    inputs2[n:] = i_n
    neighbours = replace(extended, bundle=replace(extended.bundle, item_inputs=inputs2))
    result["neighbour_id_part"] = _report(_ranks(neighbours, histories, targets, table2, bias2))

    # (b) the model trained with every item: the same users, the same histories, trained rows
    full_engine = load_engine(work / "bundles" / "full", providers=["CPUExecutionProvider"])
    fb = full_engine.bundle
    findex = full_engine.item_index
    fh = [
        np.asarray([findex[full.item_ids[i]] for i in full.sequences[u][:-1]][-MAX_HISTORY:]) for u in users
    ]
    ft = np.asarray([findex[full.item_ids[full.sequences[u][-1]]] for u in users], dtype=np.int64)
    result["trained_rows"] = _report(_ranks(full_engine, fh, ft, fb.scorer.table, fb.scorer.bias))

    # (c) the full model with the held-out items as cold items (their code part only, both sides)
    model, ckpt = load_model(Path(args.full_run) / "best.pt")
    parts = new_item_parts(model)
    cold = np.asarray([findex[i] for i in held_ids], dtype=np.int64)
    lv = np.arange(fb.table.code_length)
    table, bias = fb.scorer.table.copy(), fb.scorer.bias.copy()
    table[cold] = parts["code_table"][lv, fb.table.codes[cold]].astype(np.float64).sum(1)
    bias[cold] = parts["code_bias"][lv, fb.table.codes[cold]].astype(np.float64).sum(1)
    inputs = fb.item_inputs.copy()
    inputs[cold] = 0.0
    cold_engine = replace(full_engine, bundle=replace(fb, item_inputs=inputs))
    result["full_model_cold_rows"] = _report(_ranks(cold_engine, fh, ft, table, bias))
    result["runs"] = {
        "heldout": {
            "steps": b.manifest["source"].get("step"),
            "test": b.manifest["metrics"]["run"].get("test"),
        },
        "full": {"run": str(args.full_run), "steps": ckpt.get("step")},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prepare", help="the catalog without the held-out items, its semantic IDs")
    pr.add_argument("--data", required=True, help="the Beauty benchmark folder")
    pr.add_argument("--work", required=True)
    pr.add_argument("--held-out", type=int, default=200)
    pr.add_argument("--seed", type=int, default=0)
    me = sub.add_parser("measure", help="add the held-out items, rank them for their users")
    me.add_argument("--work", required=True)
    me.add_argument("--full-run", required=True, help="a fair-train run on the whole catalog (bundle 'full')")
    me.add_argument("--json", help="also write the numbers here")
    me.add_argument(
        "--parity-items", type=int, default=2000, help="catalog items whose codes the service path recomputes"
    )
    args = p.parse_args(argv)
    return prepare(args) if args.command == "prepare" else measure(args)


if __name__ == "__main__":
    raise SystemExit(main())
