"""DDP: the trainer under torchrun (2 CPU processes, gloo) keeps identical weights on both ranks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from conftest import TINY

REPO = Path(__file__).resolve().parents[3]

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from model.data.loading import load_dataset
    from model.semantic_ids.table import SemanticIdTable
    from model.train.config import load_config
    from model.train.distributed import init_distributed, shutdown
    from model.train.trainer import Trainer

    spec, sid, out = sys.argv[1:4]
    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    cfg = load_config(None, sys.argv[4:])
    trainer = Trainer(cfg, load_dataset(spec), SemanticIdTable.load(sid), out, dist=dist, progress=False)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit(stop_at_step=4)
    torch.save({"initial": initial, "final": trainer.model.state_dict()}, f"{out}/rank{dist.rank}.pt")
    shutdown(dist)
    """
)


def test_two_cpu_ranks_hold_identical_weights(synth, tmp_path):
    spec, sid = synth
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), spec, str(sid), str(out), *TINY]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    changed = False
    for k, v in r0["final"].items():
        assert torch.equal(v, r1["final"][k]), f"ranks differ in {k}"
        changed |= not torch.equal(v, r0["initial"][k])
    assert changed, "no training step happened"
    assert (out / "checkpoint.pt").exists()
