"""Training past one process: 1 vs N DDP processes under torchrun, and what the ID table's gradient costs.

    .venv/bin/python bench/bench_ddp_scale.py --case ../shared/data/amazon/Beauty --procs 1,2,2x1 \\
        --warmup 3 --steps 30 --nosync-steps 10 --json
    .venv/bin/python bench/bench_ddp_scale.py --case runs/expand/beauty_1m --procs 1,2 \\
        --warmup 2 --steps 8 --nosync-steps 4 --json

Every case (dataset x layout) is one ``torchrun`` launch (``python -m torch.distributed.run``): layout
``P`` is ``--standalone --nproc_per_node P``; ``NxP`` is N torchrun agents on this machine, as N
machines would run them (``--nnodes N --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT``), P
processes each. One torch thread per process, gloo on CPU, the sampled softmax and the same setup as
bench/bench_train_scale.py (its random distinct codes, ``configs/amazon.toml``, random ID init). With
one process torchrun sets WORLD_SIZE=1 and the trainer runs without DDP, as ``fair-train`` alone does.

Each rank builds the ``Trainer`` with its ``DistInfo`` (so DDP wraps the model exactly as in
``fair-train``), takes ``--warmup`` untimed steps, then ``--steps`` timed ``Trainer.train_step`` calls on
its share of epoch 0's batches (rank r takes batches r, r+N, ...), between barriers. Per case:

- ``seq_per_s``: sequences of all ranks / wall time of the timed steps; ``s_per_step`` its step time.
- ``nosync_s_first``: the first ``--nosync-steps`` timed batches again, inside
  ``DistributedDataParallel.no_sync()`` (no gradient all-reduce; only timed), against ``sync_s_first``,
  the same batches' synchronised steps (slowest rank's mean): ``comm_s_per_step`` = the difference, what
  the all-reduce costs a step (communication and waiting for the other rank).
- ``ddp_*_ms``: DDP's own reducer timings (``_get_ddp_logging_data``, averaged over the sampled steps):
  forward, backward compute, backward communication.
- ``allreduce_id_ms``: one ``dist.all_reduce`` of a tensor the size of the ID table's gradient
  (``item_emb`` [I, D] + ``item_bias`` [I]), alone, averaged over 3; ``allreduce_rest_ms`` the same for
  every other parameter.
- ``id_grad_mb``: the ID table's gradient per step (dense, float32: what DDP all-reduces every step);
  ``grad_mb`` all parameters'; ``id_grad_sparse``: whether the gradient is a sparse tensor;
  ``id_rows_touched``: rows of it that are nonzero after a synchronised step (the union of the ranks'
  batches), against ``items``.
- ``opt_step_s``: ``optimizer.step()`` alone (AdamW over every row of the table, on every rank).
- ``peak_rss_mb``: ``ru_maxrss`` of each rank (list, rank order), read before the all-reduce timing.

``--comm-hook rows`` registers ``touched_rows_hook`` on the trainer's DDP (a measured proposal, not what
``fair-train`` does): the ID table's gradient is all-reduced only on the rows some rank touched; the
mean gradient is the default's.

The last line with ``--json`` is every case's record.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: bench_train_scale
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(ROOT))

from bench_train_scale import cpu_name, random_codes  # noqa: E402
from report import print_records  # noqa: E402

from model.data.loading import load_dataset  # noqa: E402
from model.semantic_ids.table import SemanticIdTable  # noqa: E402
from model.train.batches import collate, epoch_batches  # noqa: E402
from model.train.config import load_config  # noqa: E402
from model.train.distributed import barrier, init_distributed, shutdown  # noqa: E402
from model.train.trainer import Trainer  # noqa: E402

DDP_TIMES = {"avg_forward_compute_time": "ddp_forward_ms", "avg_backward_compute_time": "ddp_backward_ms",
             "avg_backward_comm_time": "ddp_backward_comm_ms"}  # fmt: skip


def touched_rows_hook(num_items: int):
    """A DDP comm hook (``--comm-hook rows``, a proposal measured here, not what ``fair-train`` does):
    in a bucket, a gradient with one row per item is all-reduced only on the rows some rank touched
    (the union of every rank's nonzero rows, found by an all-gather of their indices); every other
    gradient is all-reduced whole. Rows outside the union are zero on every rank, so the mean gradient
    is the default hook's (NaN rows count as touched)."""

    def hook(_state, bucket):  # no annotations: DDP checks them, and this file's are strings
        buf, world, offset = bucket.buffer(), dist.get_world_size(), 0
        for param in bucket.parameters():
            view = buf[offset : offset + param.numel()]
            offset += param.numel()
            if param.dim() != 2 or param.shape[0] != num_items:
                dist.all_reduce(view)
                view.div_(world)
                continue
            grad = view.view(param.shape)
            local = torch.nonzero((grad != 0).any(dim=1)).flatten()
            counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
            dist.all_gather(counts, torch.tensor([local.numel()]))
            width = int(max(c.item() for c in counts))
            padded = torch.full((width,), -1, dtype=torch.long)
            padded[: local.numel()] = local
            gathered = [torch.empty(width, dtype=torch.long) for _ in range(world)]
            dist.all_gather(gathered, padded)
            rows = torch.unique(torch.cat(gathered))
            rows = rows[rows >= 0]
            part = grad[rows]
            dist.all_reduce(part)
            grad[rows] = part.div_(world)
        fut = torch.futures.Future()
        fut.set_result(buf)
        return fut

    return hook


def mb(numel_bytes: float) -> float:
    return round(numel_bytes / 2**20, 1)


def timed_steps(trainer: Trainer, batches: list, sync: bool) -> tuple[int, float, list[float]]:
    """(sequences, seconds between barriers, each step's seconds) of ``train_step`` over ``batches``;
    ``sync=False`` inside ``no_sync()`` (no all-reduce)."""
    quiet = trainer.ddp.no_sync() if (trainer.ddp is not None and not sync) else contextlib.nullcontext()
    seqs, each = 0, []
    barrier(trainer.dist)
    t0 = time.perf_counter()
    with quiet:
        for index in batches:
            t1 = time.perf_counter()
            trainer.train_step(collate(trainer.windows, index, trainer.item_codes))
            each.append(time.perf_counter() - t1)
            seqs += len(index)
    barrier(trainer.dist)
    return seqs, time.perf_counter() - t0, each


def allreduce_ms(tensors: list[torch.Tensor], repeats: int = 3) -> float:
    """Mean wall time of one all-reduce of a flat buffer as large as ``tensors`` together."""
    buf = torch.zeros(sum(t.numel() for t in tensors), dtype=torch.float32)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(buf)
    return round((time.perf_counter() - t0) / repeats * 1000, 1)


def measure_rank(args: argparse.Namespace) -> dict:
    """One rank of one case (run by torchrun): build the trainer, time the steps, write rank<R>.json."""
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    t0 = time.perf_counter()
    data = load_dataset(args.case[0])
    table = SemanticIdTable(data.item_ids, random_codes(data.num_items), 256)
    load_s = time.perf_counter() - t0
    sets = ["train.softmax=sampled", f"train.num_negatives={args.num_negatives}", "train.item_id_init=random",
            "train.budget_minutes=0", *args.set]  # fmt: skip
    cfg = load_config(args.config, sets)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, data, table, Path(args.out) / "run", dist=info, progress=False)
    build_s = time.perf_counter() - t0
    if trainer.ddp is not None:
        trainer.ddp._set_ddp_runtime_logging_sample_rate(1)
        if args.comm_hook == "rows":
            trainer.ddp.register_comm_hook(None, touched_rows_hook(data.num_items))
    world, rank = info.world_size, info.rank
    need = args.warmup + args.steps
    batches = epoch_batches(trainer.windows, cfg.train.batch_size, 0, 0, world)[: need * world]
    mine = batches[rank::world]
    if len(mine) < need:
        raise SystemExit(f"{args.case[0]}: only {len(mine)} batches per rank, {need} needed")
    (trainer.ddp or trainer.model).train()
    timed_steps(trainer, mine[: args.warmup], sync=True)
    timed = mine[args.warmup : args.warmup + args.steps]
    seqs, seconds, each = timed_steps(trainer, timed, sync=True)
    emb, bias = trainer.model.item_emb.weight, trainer.model.item_bias
    if emb.grad.is_sparse:  # train.sparse_item_ids: the gradient holds the touched rows only
        grad = emb.grad.coalesce()
        rows = int(grad.indices().unique().numel())
        id_grad_bytes = grad.values().numel() * 4 + grad.indices().numel() * 8
    else:
        rows = int((emb.grad.abs().sum(dim=1) > 0).sum())  # after the all-reduce: every rank's rows
        id_grad_bytes = emb.grad.numel() * 4
    ddp_times = {}
    if trainer.ddp is not None:
        logged = trainer.ddp._get_ddp_logging_data()
        ddp_times = {v: round(logged.get(k, 0) / 1e6, 1) for k, v in DDP_TIMES.items()}
    # the first timed batches again without the all-reduce: same sizes, so the difference is the sync
    _, _, nosync_each = timed_steps(trainer, timed[: args.nosync_steps], sync=False)
    t0 = time.perf_counter()
    for _ in range(3):
        trainer.optimizer.step()
    opt_s = (time.perf_counter() - t0) / 3
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    rest = [p for p in params if p is not emb and p is not bias]
    comm = {}
    if info.enabled:
        comm = {"allreduce_id_ms": allreduce_ms([emb, bias]), "allreduce_rest_ms": allreduce_ms(rest)}
    rec = {
        "rank": rank, "world": world, "seqs": seqs, "seconds": seconds,
        "sync_each": each[: args.nosync_steps], "nosync_each": nosync_each, "opt_step_s": opt_s,
        "peak_rss_mb": round(peak_rss), "load_s": round(load_s, 1), "build_s": round(build_s, 1),
        "items": data.num_items, "batch_size": cfg.train.batch_size, "id_rows_touched": rows,
        "id_grad_mb": mb(id_grad_bytes + bias.grad.numel() * 4), "id_grad_sparse": emb.grad.is_sparse,
        "grad_mb": mb(sum(p.numel() * p.element_size() for p in params)),
        "find_unused_parameters": None if trainer.ddp is None else trainer.ddp.find_unused_parameters,
        "gradient_as_bucket_view": None if trainer.ddp is None else trainer.ddp.gradient_as_bucket_view,
        **ddp_times, **comm,
    }  # fmt: skip
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(rec))
    barrier(info)
    shutdown(info)
    return rec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(path: str, layout: str, args: argparse.Namespace, out: str) -> list[subprocess.Popen]:
    """The torchrun agent(s) of one case: ``P`` standalone, or ``NxP`` through a c10d rendezvous."""
    nodes, _, procs = layout.rpartition("x")
    child = [__file__, "--rank-child", "--case", path, "--out", out, "--config", args.config,
             "--num-negatives", str(args.num_negatives), "--warmup", str(args.warmup),
             "--steps", str(args.steps), "--nosync-steps", str(args.nosync_steps), "--comm-hook", args.comm_hook,
             *(a for s in args.set for a in ("--set", s))]  # fmt: skip
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", procs]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if not nodes:
        return [subprocess.Popen([*run, "--standalone", *child], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)]  # fmt: skip
    endpoint = f"127.0.0.1:{free_port()}"
    rdzv = ["--nnodes", nodes, "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "bench"]
    return [subprocess.Popen([*run, *rdzv, *child], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(int(nodes))]  # fmt: skip


def run_case(path: str, layout: str, args: argparse.Namespace) -> dict:
    """Launch one case and fold its ranks' records into one row."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        agents = launch(path, layout, args, out)
        errors = [err for p in agents for _, err in [p.communicate()] if p.returncode]
        wall = time.perf_counter() - t0
        if errors:
            return {"data": Path(path).name, "layout": layout, "error": errors[0][-500:]}
        ranks = sorted((json.loads(f.read_text()) for f in Path(out).glob("rank*.json")),
                       key=lambda r: r["rank"])  # fmt: skip
    r0, world = ranks[0], len(ranks)
    seconds = max(r["seconds"] for r in ranks)
    step = seconds / args.steps
    # per rank: the same batches with and without the all-reduce; the slowest rank's means
    n = max(1, args.nosync_steps)
    sync_step = max(sum(r["sync_each"]) / n for r in ranks)
    nosync_step = max(sum(r["nosync_each"]) / n for r in ranks)
    rec = {
        "data": Path(path).name, "items": r0["items"], "layout": layout, "processes": world,
        "comm_hook": args.comm_hook if world > 1 else None,
        "batch_per_rank": r0["batch_size"], "steps": args.steps,
        "seq_per_s": round(sum(r["seqs"] for r in ranks) / seconds, 1), "s_per_step": round(step, 3),
        "sync_s_first": round(sync_step, 3), "nosync_s_first": round(nosync_step, 3),
        "comm_s_per_step": round(sync_step - nosync_step, 3) if args.nosync_steps and world > 1 else 0.0,
        "opt_step_s": round(max(r["opt_step_s"] for r in ranks), 3),
        "id_grad_mb": r0["id_grad_mb"], "grad_mb": r0["grad_mb"], "id_grad_sparse": r0["id_grad_sparse"],
        "id_rows_touched": r0["id_rows_touched"],
        "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
        "load_s": r0["load_s"], "build_s": r0["build_s"], "wall_s": round(wall, 1),
    }  # fmt: skip
    for key in (*DDP_TIMES.values(), "allreduce_id_ms", "allreduce_rest_ms", "find_unused_parameters",
                "gradient_as_bucket_view"):  # fmt: skip
        if key in r0:
            rec[key] = r0[key]
    rec["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    rec["machine"] = cpu_name()
    return rec


def parse_layout(text: str) -> list[str]:
    layouts = text.split(",")
    for lay in layouts:
        nodes, _, procs = lay.rpartition("x")
        if not procs.isdigit() or int(procs) < 1 or (nodes and (not nodes.isdigit() or int(nodes) < 1)):
            raise argparse.ArgumentTypeError(f"--procs {text!r}: expected P or NxP, comma-separated")
    return layouts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", required=True, help="a dataset (fair-data layout); repeat")
    p.add_argument("--procs", type=parse_layout, default=["1", "2"],
                   help="layouts: P processes on one agent, NxP = N agents (c10d rendezvous) x P; default 1,2")  # fmt: skip
    p.add_argument("--config", default=str(ROOT / "configs/amazon.toml"))
    p.add_argument("--set", action="append", default=[], help="--set override for every case")
    p.add_argument("--num-negatives", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed synchronised steps per rank")
    p.add_argument("--nosync-steps", type=int, default=5, help="timed steps inside no_sync() per rank")
    p.add_argument("--comm-hook", default="allreduce", choices=("allreduce", "rows"),
                   help="allreduce: DDP's default (fair-train); rows: all-reduce only the ID table's touched rows")  # fmt: skip
    p.add_argument("--rank-child", action="store_true", help=argparse.SUPPRESS)  # one rank, under torchrun
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print every record as one JSON list, last line")
    args = p.parse_args(argv)
    if not 0 <= args.nosync_steps <= args.steps:
        p.error("--nosync-steps must be between 0 and --steps")
    if args.rank_child:
        measure_rank(args)
        return 0
    records = []
    for path in args.case:
        for layout in args.procs:
            rec = run_case(path, layout, args)
            records.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
    print_records(records, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
