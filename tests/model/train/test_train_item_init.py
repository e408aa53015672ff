"""Text embeddings in training: train.item_id_init = "text" (where the ID table starts) and
model.item_text = true (a projected text part beside the ID table)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY

from model.data.loading import load_dataset
from model.semantic_ids.table import SemanticIdTable
from model.train.cli import main
from model.train.config import ConfigError, load_config
from model.train.item_init import text_init
from model.train.trainer import Trainer

torch.set_num_threads(1)


def _low_rank_embeddings(items: int, rank: int = 6, dim: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((items, rank)) @ rng.standard_normal((rank, dim)) + 3.0).astype(np.float32)


def test_text_init_keeps_the_geometry_of_the_texts_at_the_random_init_scale():
    emb = _low_rank_embeddings(50)
    rows = text_init(emb, dim=16).numpy()
    assert rows.shape == (50, 16) and rows.dtype == np.float32
    assert abs(rows.std() - 0.02) < 1e-4
    # rank 6 < 16: the projection loses nothing, so distances between items are kept up to one scale
    d_text = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    d_rows = np.linalg.norm(rows[:, None] - rows[None], axis=-1)
    ratio = d_rows[d_text > 0] / d_text[d_text > 0]
    assert np.allclose(ratio, ratio.mean(), rtol=1e-3)
    assert np.allclose(rows[:, 6:], 0, atol=1e-6)  # components beyond the rank carry nothing
    # fewer dimensions than the rank: the largest-variance directions come first
    var = text_init(emb, dim=3).numpy().var(0)
    assert var[0] >= var[1] >= var[2] > 0
    with pytest.raises(ValueError, match="NaN"):
        text_init(np.full((4, 3), np.nan), dim=2)
    with pytest.raises(ValueError, match="shape"):
        text_init(np.ones(5), dim=2)


def test_trainer_starts_the_id_table_from_the_text_and_checks_what_it_gets(synth, tmp_path):
    spec, sid = synth
    data, table = load_dataset(spec), SemanticIdTable.load(sid)
    emb = _low_rank_embeddings(data.num_items)
    cfg = load_config(None, [*TINY, "train.item_id_init=text"])
    trainer = Trainer(cfg, data, table, tmp_path / "a", progress=False, item_embeddings=emb)
    torch.testing.assert_close(trainer.model.item_emb.weight.detach(), text_init(emb, 32))
    # everything but the ID table starts as in a random-init run
    plain = Trainer(load_config(None, TINY), data, table, tmp_path / "b", progress=False)
    torch.testing.assert_close(trainer.model.code_emb.weight, plain.model.code_emb.weight)
    assert not torch.allclose(trainer.model.item_emb.weight, plain.model.item_emb.weight)
    with pytest.raises(ConfigError, match="text embeddings"):
        Trainer(cfg, data, table, tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="shape"):
        Trainer(cfg, data, table, tmp_path / "d", progress=False, item_embeddings=emb[:-1])
    with pytest.raises(ConfigError, match="item_ids"):  # refused when the config is read
        load_config(None, [*TINY, "train.item_id_init=text", "model.item_ids=false"])
    with pytest.raises(ConfigError, match="NaN"):
        bad = emb.copy()
        bad[3, 1] = np.nan
        Trainer(cfg, data, table, tmp_path / "f", progress=False, item_embeddings=bad)
    with pytest.raises(ConfigError, match="item_id_init"):
        load_config(None, ["train.item_id_init=pca"])
    with pytest.raises(ConfigError, match="item_id_init_std"):
        load_config(None, ["train.item_id_init_std=0.0"])
    # train.item_id_init_std sets the size of the start, not its shape
    wide = load_config(None, [*TINY, "train.item_id_init=text", "train.item_id_init_std=0.1"])
    rows = Trainer(
        wide, data, table, tmp_path / "g", progress=False, item_embeddings=emb
    ).model.item_emb.weight
    torch.testing.assert_close(rows.detach(), text_init(emb, 32) * 5.0, rtol=1e-4, atol=1e-6)


def test_fair_train_reads_item_embeddings_from_a_file(synth, tmp_path, capsys):
    spec, sid = synth
    data = load_dataset(spec)
    path = tmp_path / "emb.npy"
    np.save(path, _low_rank_embeddings(data.num_items))
    sets = [x for s in [*TINY, "train.max_steps=3", "train.item_id_init=text"] for x in ("--set", s)]
    out = tmp_path / "run"
    rc = main(["--data", spec, "--sid", str(sid), "--out", str(out), "--item-embeddings", str(path),
               "--no-final-eval", "--quiet", *sets])  # fmt: skip
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["train"]["item_id_init"] == "text"
    np.save(path, _low_rank_embeddings(data.num_items + 1))
    rc = main(["--data", spec, "--sid", str(sid), "--out", str(tmp_path / "bad"), "--item-embeddings",
               str(path), "--quiet", *sets])  # fmt: skip
    assert rc == 2 and "fair-train: error" in capsys.readouterr().err


def test_trainer_gives_a_text_model_its_width_and_the_embeddings(synth, tmp_path):
    spec, sid = synth
    data, table = load_dataset(spec), SemanticIdTable.load(sid)
    emb = _low_rank_embeddings(data.num_items, dim=24)
    cfg = load_config(None, [*TINY, "model.item_text=true", "train.max_steps=2"])
    trainer = Trainer(cfg, data, table, tmp_path / "a", progress=False, item_embeddings=emb)
    assert trainer.cfg.model.text_dim == 24
    torch.testing.assert_close(trainer.model.item_text, torch.from_numpy(emb))
    trainer.fit()
    saved = json.loads((tmp_path / "a" / "config.json").read_text())["model"]
    assert saved["item_text"] and saved["text_dim"] == 24
    with pytest.raises(ConfigError, match="item_text"):
        Trainer(cfg, data, table, tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="shape"):
        Trainer(cfg, data, table, tmp_path / "c", progress=False, item_embeddings=emb[:5])


def test_fair_train_refuses_a_table_built_from_other_embeddings_without_them(synth, tmp_path, capsys):
    """The text start means the vectors the semantic IDs came from: a table built from another encoder
    needs those vectors given explicitly, or fair-train would silently embed with MiniLM instead."""
    spec, sid = synth
    table = SemanticIdTable.load(sid)
    other = tmp_path / "other.npz"
    SemanticIdTable(
        table.item_ids, table.codes, table.codebook_size, meta={"encoder": "precomputed:abc"}
    ).save(other)
    sets = [x for s in [*TINY, "train.max_steps=2", "train.item_id_init=text"] for x in ("--set", s)]
    rc = main(["--data", spec, "--sid", str(other), "--out", str(tmp_path / "run"), "--quiet", *sets])
    assert rc == 2 and "--item-embeddings" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
