"""Run directory, checkpoint round trip and exact resume through ``fair-train``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import train_cli

from model.semantic_ids.table import SemanticIdTable
from model.train.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint

torch.set_num_threads(1)
CONTRACT_KEYS = {
    "model", "model_config", "train_config", "optimizer", "scheduler", "step", "epoch",
    "best_metric", "sid_sha256", "data_fingerprint", "rng",
}  # fmt: skip


def _train(spec, sid, out, *extra):
    return train_cli(spec, sid, out, *extra)


def test_run_dir_and_checkpoint_round_trip(synth, tmp_path):
    spec, sid = synth
    out = tmp_path / "run"
    assert _train(spec, sid, out, "--stop-at-step", "3") == 0
    for name in (
        "config.json",
        "checkpoint.pt",
        "best.pt",
        "semantic_ids.npz",
        "popular.npy",
        "log.jsonl",
        "curves.png",
    ):
        assert (out / name).exists(), name
    ckpt = read_checkpoint(out / "checkpoint.pt")
    assert set(ckpt) >= CONTRACT_KEYS and ckpt["step"] == 3
    assert ckpt["sid_sha256"] == SemanticIdTable.load(sid).sha256()
    assert json.loads((out / "config.json").read_text())["model"] == ckpt["model_config"]
    popular = np.load(out / "popular.npy")
    assert popular.dtype == np.int64 and sorted(popular.tolist()) == list(range(len(popular)))
    model, loaded = load_model(out)  # a run directory means its best.pt
    assert not model.training and loaded["step"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    # saving what we loaded gives back the same model
    save_checkpoint(tmp_path / "copy.pt", loaded)
    again, _ = load_model(tmp_path / "copy.pt")
    codes = torch.zeros(2, 3, 3, dtype=torch.long)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    items = torch.tensor([[-1, 4, 7], [1, 2, 3]])
    pairs = zip(
        again.next_item_scores(codes, items, mask), model.next_item_scores(codes, items, mask), strict=True
    )
    for a, b in pairs:
        torch.testing.assert_close(a, b)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "nothing.pt")
    # a second run into the same directory is refused rather than overwriting it
    assert _train(spec, sid, out, "--stop-at-step", "1") == 2


def test_resume_continues_exactly(synth, tmp_path):
    spec, sid = synth
    straight, chunked = tmp_path / "straight", tmp_path / "chunked"
    assert _train(spec, sid, straight, "--stop-at-step", "6") == 0
    assert _train(spec, sid, chunked, "--stop-at-step", "3") == 0
    assert _train(spec, sid, chunked, "--resume", str(chunked), "--stop-at-step", "6") == 0
    a, b = read_checkpoint(straight / "checkpoint.pt"), read_checkpoint(chunked / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    assert a["rng"]["batch_in_epoch"] == b["rng"]["batch_in_epoch"] and a["epoch"] == b["epoch"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    log = [json.loads(line) for line in (chunked / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_a_run_written_before_newer_config_keys_existed_still_resumes(synth, tmp_path):
    """A checkpoint and config.json without keys added later (id_dropout, item_text, text_dim,
    item_id_init, item_id_init_std, ema_decay): those count with their defaults, so the run resumes instead of being refused."""
    spec, sid = synth
    run = tmp_path / "old"
    assert _train(spec, sid, run, "--stop-at-step", "3") == 0
    new_model = ("id_dropout", "item_text", "text_dim")
    new_train = ("item_id_init", "item_id_init_std", "ema_decay")
    ckpt = read_checkpoint(run / "checkpoint.pt")
    for key in new_model:
        del ckpt["model_config"][key]
    for key in new_train:
        del ckpt["train_config"][key]
    save_checkpoint(run / "checkpoint.pt", ckpt)
    cfg = json.loads((run / "config.json").read_text())
    for key in new_model:
        del cfg["model"][key]
    for key in new_train:
        del cfg["train"][key]
    (run / "config.json").write_text(json.dumps(cfg))
    assert _train(spec, sid, run, "--resume", str(run), "--stop-at-step", "5") == 0
    assert read_checkpoint(run / "checkpoint.pt")["step"] == 5


def test_time_budget_stops_training_at_the_end_of_the_cosine(synth, tmp_path, capsys):
    spec, sid = synth
    out = tmp_path / "run"
    assert _train(spec, sid, out, "--set", "train.budget_minutes=0.003") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["reason"] == "budget_minutes"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    last = [r for r in log if r["kind"] == "train"][-1]
    ckpt = read_checkpoint(out / "checkpoint.pt")
    assert ckpt["rng"]["train_seconds"] >= 0.18
    assert last["lr"] == pytest.approx(ckpt["train_config"]["lr"] * ckpt["train_config"]["min_lr_ratio"])


def test_a_one_token_checkpoint_with_the_old_unused_level_table_still_loads(tmp_path):
    """One-token models written before the unused level embedding was dropped carry level_emb.weight."""
    from model.fair import FAIR, FAIRConfig
    from model.train.checkpoint import untrained_checkpoint

    cfg = FAIRConfig(codebook_size=8, num_levels=3, d_model=16, n_layers=1, n_heads=2, num_items=5)
    state = {**FAIR(cfg).state_dict(), "level_emb.weight": torch.zeros(3, 16)}
    save_checkpoint(tmp_path / "old.pt", untrained_checkpoint(state, cfg.to_dict(), "0" * 64, {}))
    model, _ = load_model(tmp_path / "old.pt")
    assert model.level_emb is None and model.cfg.item_tokens == "item"


def test_item_id_weight_decay_shrinks_only_the_item_id_table(synth, tmp_path):
    """train.item_id_weight_decay decays the item-ID rows (the embedding with one row per item); the
    default leaves every embedding undecayed, as before the key existed."""
    spec, sid = synth
    runs = {}
    for wd in (0.0, 50.0):
        out = tmp_path / f"wd{wd:g}"
        assert _train(spec, sid, out, "--stop-at-step", "6", "--set", f"train.item_id_weight_decay={wd}") == 0
        runs[wd] = read_checkpoint(out / "checkpoint.pt")
    norm = {wd: ckpt["model"]["item_emb.weight"].norm().item() for wd, ckpt in runs.items()}
    assert norm[50.0] < 0.7 * norm[0.0], norm
    assert len(runs[0.0]["optimizer"]["param_groups"]) == 2  # old two-group checkpoints still resume
    assert [g["weight_decay"] for g in runs[50.0]["optimizer"]["param_groups"]][-1] == 50.0


def test_weight_average_is_what_is_validated_kept_and_resumed_exactly(synth, tmp_path):
    """train.ema_decay: checkpoints keep the moving average as "model" (what fair-eval and fair-export
    read) and the raw weights beside it, and a resume continues both exactly."""
    spec, sid = synth
    ema = ("--set", "train.ema_decay=0.5")
    straight, chunked, plain = tmp_path / "straight", tmp_path / "chunked", tmp_path / "plain"
    assert _train(spec, sid, straight, "--stop-at-step", "6", *ema) == 0
    assert _train(spec, sid, chunked, "--stop-at-step", "3", *ema) == 0
    assert _train(spec, sid, chunked, "--resume", str(chunked), "--stop-at-step", "6") == 0
    assert _train(spec, sid, plain, "--stop-at-step", "6") == 0
    a, b, p = (read_checkpoint(d / "checkpoint.pt") for d in (straight, chunked, plain))
    assert a["ema_n_averaged"] == b["ema_n_averaged"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["train_model"][k], b["train_model"][k]), k
        # the raw weights are those of a run without the average; the average lags behind them
        assert torch.equal(a["train_model"][k], p["model"][k]), k
    assert not torch.equal(a["model"]["item_emb.weight"], a["train_model"]["item_emb.weight"])
    model, _ = load_model(straight)  # best.pt: the average
    best = read_checkpoint(straight / "best.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, best["model"][k]), k
    assert _train(spec, sid, tmp_path / "bad", "--set", "train.ema_decay=1.0") == 2


class _WritesAFile:
    """A pickled object whose unpickling calls ``open(marker, "w")``: the shape of every pickle
    exploit (a callable named by a global, run with attacker-chosen arguments)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(synth, tmp_path, capsys):
    """read_checkpoint, load_model (fair-eval, fair-export) and a resume refuse a checkpoint holding
    more than tensors and plain types, with an error naming the file, and nothing of it executes."""
    spec, sid = synth
    run = tmp_path / "run"
    assert _train(spec, sid, run, "--stop-at-step", "1") == 0
    marker = tmp_path / "pwned"
    for name in ("checkpoint.pt", "best.pt"):
        ckpt = torch.load(run / name, weights_only=True)
        ckpt["rng"]["payload"] = _WritesAFile(marker)
        torch.save(ckpt, run / name)  # torch.save itself does not check: an attacker need not either
    for read in (read_checkpoint, load_model):
        with pytest.raises(CheckpointError, match=r"best\.pt: refused: .*weights_only=True.*io\.open"):
            read(run)
    assert _train(spec, sid, run, "--resume", str(run), "--stop-at-step", "2") == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoint.pt'}: refused" in err and "Traceback" not in err
    assert not marker.exists()
    # the payload is live: a plain unpickling of the same file runs it (so the check above can fail)
    torch.load(run / "best.pt", weights_only=False)
    assert marker.exists()


def test_saving_what_could_not_be_loaded_back_is_refused_before_writing(tmp_path):
    """Numpy RNG state (a tuple holding an ndarray) or a numpy scalar would make every later read
    fail: save_checkpoint names the entry and writes no file."""
    from model.fair import FAIR, FAIRConfig
    from model.train.checkpoint import untrained_checkpoint

    cfg = FAIRConfig(codebook_size=8, num_levels=3, d_model=16, n_layers=1, n_heads=2)
    good = untrained_checkpoint(FAIR(cfg).state_dict(), cfg.to_dict(), "0" * 64, {})
    for entry, value in (("rng", np.random.get_state()), ("best_metric", np.float64(0.5))):
        path = tmp_path / f"{entry}.pt"
        with pytest.raises(CheckpointError, match=rf"not written: checkpoint\['{entry}'\].*numpy"):
            save_checkpoint(path, {**good, entry: value})
        assert not path.exists() and not list(tmp_path.glob(f".{entry}.pt.*"))
    save_checkpoint(tmp_path / "good.pt", good)
    assert read_checkpoint(tmp_path / "good.pt")["step"] == 0
