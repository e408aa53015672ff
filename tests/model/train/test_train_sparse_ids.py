"""The row-sparse item-ID table (``train.sparse_item_ids``): which runs use it, that a step touches only
the rows it looked up, that its first step equals dense AdamW's (the reference form), its clipping, and
its checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY, train_cli

from model.data.loading import load_dataset
from model.semantic_ids.table import SemanticIdTable
from model.train.batches import collate, epoch_batches
from model.train.checkpoint import read_checkpoint, save_checkpoint
from model.train.config import ConfigError, TrainConfig, load_config
from model.train.optim import clip_grad_norm, row_sparse_ids
from model.train.trainer import Trainer

torch.set_num_threads(1)
SAMPLED = [*TINY, "train.softmax=sampled", "train.num_negatives=16"]


def _trainer(synth, out, *sets: str) -> Trainer:
    spec, sid = synth
    cfg = load_config(None, [*SAMPLED, *sets])
    return Trainer(cfg, load_dataset(spec), SemanticIdTable.load(sid), out, progress=False)


def test_auto_is_row_sparse_exactly_with_the_sampled_softmax_and_no_table_decay():
    assert TrainConfig(softmax="sampled").sparse_ids_for(100)
    assert not TrainConfig(softmax="full").sparse_ids_for(10**6)
    assert TrainConfig().sparse_ids_for(10**6) and not TrainConfig().sparse_ids_for(10**4)  # auto softmax
    assert not TrainConfig(softmax="sampled", item_id_weight_decay=0.1).sparse_ids_for(100)
    assert TrainConfig(softmax="full", sparse_item_ids="on").sparse_ids_for(100)
    assert not TrainConfig(softmax="sampled", sparse_item_ids="off").sparse_ids_for(100)
    with pytest.raises(ConfigError, match="SparseAdam has no weight decay"):
        TrainConfig(sparse_item_ids="on", item_id_weight_decay=0.1)
    with pytest.raises(ConfigError, match="sparse_item_ids must be one of"):
        TrainConfig(sparse_item_ids="yes")


def test_a_sparse_step_moves_only_the_rows_it_looked_up(synth, tmp_path):
    trainer = _trainer(synth, tmp_path / "run")
    opt = trainer.optimizer
    table = trainer.model.item_emb.weight
    assert isinstance(opt.sparse, torch.optim.SparseAdam) and trainer.model.item_emb.sparse
    assert all(p is not table for g in opt.dense.param_groups for p in g["params"])
    before = table.detach().clone()
    batch = collate(trainer.windows, epoch_batches(trainer.windows, 32, 0, 0)[0], trainer.item_codes)
    trainer.model.train()
    terms = trainer.losses(batch, trainer._seed_step())
    opt.zero_grad()
    terms["loss"].backward()
    assert table.grad.is_sparse
    touched = table.grad.coalesce().indices()[0].unique()
    trainer.train_step(batch)
    moved = (table.detach() != before).any(dim=1).nonzero()[:, 0]
    assert 0 < len(moved) < table.size(0)
    assert set(moved.tolist()) <= set(touched.tolist())
    state = opt.sparse.state[table]
    untouched = torch.ones(table.size(0), dtype=torch.bool)
    untouched[touched] = False
    assert (state["exp_avg"][untouched] == 0).all()  # lazy: moments of rows never looked up stay zero


def test_the_first_sparse_step_is_the_first_dense_adamw_step(synth, tmp_path):
    """Adam's first step on a row is -lr * g / (|g| + eps), and a row with no gradient does not move: so
    after one step the row-sparse table equals the dense one (the reference form) up to where each adds
    eps. From the second step on they differ by design (AdamW keeps moving untouched rows)."""
    sparse = _trainer(synth, tmp_path / "sparse")
    dense = _trainer(synth, tmp_path / "dense", "train.sparse_item_ids=off")
    assert dense.optimizer.sparse is None and not dense.model.item_emb.sparse
    dense.model.load_state_dict(copy.deepcopy(sparse.model.state_dict()))
    batch = collate(sparse.windows, epoch_batches(sparse.windows, 32, 0, 0)[0], sparse.item_codes)
    before = sparse.model.item_emb.weight.detach().clone()
    for t in (sparse, dense):
        t.model.train()
        t.step = 0
        t.train_step(batch)
    # Adam's first step is lr * g / (|g| + eps'): SparseAdam adds eps before the bias correction, AdamW
    # after it (eps' = eps / sqrt(1 - beta2) vs eps, ~7e-8 vs 1e-8 here), so the two agree to ~eps'/|g|:
    # compared where |g| > 1e-4 (<= 0.1%); where |g| is tiny or rounding noise both steps are below lr
    grad = dense.model.item_emb.weight.grad  # the clipped gradient the dense step used
    clear = grad.abs() > 1e-4
    got = sparse.model.item_emb.weight.detach() - before  # the steps
    want = dense.model.item_emb.weight.detach() - before
    torch.testing.assert_close(got[clear], want[clear], rtol=2e-3, atol=1e-7)
    lr = dense.optimizer.last_lr()
    assert (got - want).abs().max() <= 2 * lr
    assert clear.sum() > 0.5 * (grad != 0).sum()  # most of the step is compared closely
    torch.testing.assert_close(sparse.model.head_proj, dense.model.head_proj, rtol=1e-5, atol=1e-6)


def test_clipping_a_sparse_gradient_matches_torch_on_its_dense_form():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(20, 4, sparse=True)
    lin = torch.nn.Linear(4, 3)
    twin_emb, twin_lin = copy.deepcopy(emb), copy.deepcopy(lin)
    twin_emb.sparse = False
    ids = torch.tensor([1, 5, 5, 7, 1, 1])  # repeats: an uncoalesced sparse gradient
    (lin(emb(ids)) ** 2).sum().backward()
    (twin_lin(twin_emb(ids)) ** 2).sum().backward()
    for max_norm in (0.05, 1e6):  # clipped, and left alone
        e, t = copy.deepcopy(emb), copy.deepcopy(twin_emb)
        e.weight.grad, t.weight.grad = emb.weight.grad.clone(), twin_emb.weight.grad.clone()
        lin_g, twin_g = lin.weight.grad.clone(), twin_lin.weight.grad.clone()
        lp, tp = copy.deepcopy(lin), copy.deepcopy(twin_lin)
        lp.weight.grad, tp.weight.grad = lin_g, twin_g
        lp.bias.grad, tp.bias.grad = lin.bias.grad.clone(), twin_lin.bias.grad.clone()
        got = clip_grad_norm([e.weight, lp.weight, lp.bias], max_norm)
        want = torch.nn.utils.clip_grad_norm_([t.weight, tp.weight, tp.bias], max_norm)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(e.weight.grad.to_dense(), t.weight.grad)
        torch.testing.assert_close(lp.weight.grad, tp.weight.grad)


def _train(spec, sid, out, *extra):
    return train_cli(spec, sid, out, *extra, sets=SAMPLED)


def test_a_sparse_run_checkpoints_both_optimizers_and_resumes_exactly(synth, tmp_path):
    spec, sid = synth
    straight, chunked = tmp_path / "straight", tmp_path / "chunked"
    assert _train(spec, sid, straight, "--stop-at-step", "6") == 0
    assert _train(spec, sid, chunked, "--stop-at-step", "3") == 0
    assert _train(spec, sid, chunked, "--resume", str(chunked), "--stop-at-step", "6") == 0
    a, b = read_checkpoint(straight / "checkpoint.pt"), read_checkpoint(chunked / "checkpoint.pt")
    assert {"sparse_optimizer", "sparse_scheduler"} <= set(a)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["sparse_optimizer"]["state"][0], b["sparse_optimizer"]["state"][0]
    assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_resuming_with_the_other_table_form_is_a_clear_error(synth, tmp_path, capsys):
    spec, sid = synth
    run = tmp_path / "run"
    assert _train(spec, sid, run, "--stop-at-step", "2") == 0
    ckpt = read_checkpoint(run / "checkpoint.pt")
    trainer = _trainer(synth, tmp_path / "other", "train.sparse_item_ids=off")
    with pytest.raises(ValueError, match="trained row-sparse.*sparse_item_ids = on"):
        trainer.optimizer.load_state_dict(ckpt)


def test_under_ddp_on_cuda_auto_stays_dense_and_on_is_refused():
    """NCCL has no sparse all-reduce in standard PyTorch builds: DDP on CUDA trains the table dense."""
    sampled = TrainConfig(softmax="sampled")
    assert row_sparse_ids(sampled, 100, distributed=False, device="cuda")
    assert row_sparse_ids(sampled, 100, distributed=True, device="cpu")  # gloo all-reduces sparse tensors
    assert not row_sparse_ids(sampled, 100, distributed=True, device="cuda:0")
    with pytest.raises(ConfigError, match="NCCL"):
        row_sparse_ids(
            TrainConfig(softmax="sampled", sparse_item_ids="on"), 100, distributed=True, device="cuda"
        )


def test_a_run_saved_before_the_key_existed_resumes_dense(synth, tmp_path):
    """A sampled-softmax run checkpointed before train.sparse_item_ids trained its table dense: its
    config.json and checkpoint, without the key, read it as "off" (today's default would make it sparse)."""
    spec, sid = synth
    run = tmp_path / "run"
    assert _train(spec, sid, run, "--stop-at-step", "2", "--set", "train.sparse_item_ids=off") == 0
    ckpt_path = run / "checkpoint.pt"
    ckpt = read_checkpoint(ckpt_path)
    del ckpt["train_config"]["sparse_item_ids"]  # as written before the key existed
    save_checkpoint(ckpt_path, ckpt)
    config = json.loads((run / "config.json").read_text())
    del config["train"]["sparse_item_ids"]
    (run / "config.json").write_text(json.dumps(config))
    assert _train(spec, sid, run, "--resume", str(run), "--stop-at-step", "4") == 0
    assert "sparse_optimizer" not in read_checkpoint(ckpt_path)
