"""Config loading and the CLI's up-front errors: each says what and where, before any training."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from model.data.loading import load_dataset
from model.semantic_ids.table import SemanticIdTable
from model.train.cli import main
from model.train.config import SECTIONS, ConfigError, load_config, parse_set

REPO = Path(__file__).resolve().parents[3]


def test_default_config_file_loads_and_equals_the_dataclass_defaults():
    assert load_config(REPO / "configs" / "fair_default.toml") == load_config(None)
    # and it names every key (a key missing from the file would also "equal" its default)
    documented = tomllib.loads((REPO / "configs" / "fair_default.toml").read_text())
    for section, cls in SECTIONS.items():
        assert set(documented[section]) == {f.name for f in fields(cls)}, section


def test_overrides_are_typed_and_ints_widen_to_floats():
    cfg = load_config(None, ["train.lr=1", "model.attention=standard", 'train.perturb_ops=["drop"]'])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.attention == "standard" and cfg.train.perturb_ops == ["drop"]
    assert parse_set("train.robust=false") == {"train": {"robust": False}}


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.lrr=1", "unknown key train.lrr"),
        ("trian.lr=1", "unknown section [trian]"),
        ("train.lr=fast", "train.lr must be float, got str"),
        ("model.d_model=1.5", "model.d_model must be int, got float"),
        ("train.bf16=1", "train.bf16 must be bool, got int"),
        ('train.perturb_ops=["shuffle"]', "unknown ['shuffle']"),
        ("lr=1", "expected section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(item, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, [item])
    assert message in str(err.value)


def test_bad_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlr = 1e-3\nbatchsize = 12\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown key train\.batchsize"):
        load_config(path)
    path.write_text("[train\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")


def test_a_config_extends_another_and_overrides_only_what_it_lists(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "root.toml").write_text("[train]\nlr = 1e-3\nbatch_size = 32\n")
    (tmp_path / "base" / "mid.toml").write_text('extends = "root.toml"\n[train]\nbatch_size = 64\nseed = 7\n')
    (tmp_path / "leaf.toml").write_text('extends = "base/mid.toml"\n[train]\nseed = 9\n')
    cfg = load_config(tmp_path / "leaf.toml", ["train.lr=0.5"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.seed) == (0.5, 64, 9)
    assert load_config(tmp_path / "base" / "mid.toml").train.seed == 7  # the parent file is unchanged


def test_shipped_sports_config_differs_from_amazon_only_where_it_says():
    sports = tomllib.loads((REPO / "configs" / "amazon_sports.toml").read_text())
    assert sports.pop("extends") == "amazon.toml"
    base = load_config(REPO / "configs" / "amazon.toml").to_dict()
    merged = load_config(REPO / "configs" / "amazon_sports.toml").to_dict()
    changed = {(s, k) for s in merged for k in merged[s] if merged[s][k] != base[s][k]}
    assert changed == {(s, k) for s, values in sports.items() for k in values}


def test_a_symlinked_config_finds_its_parent_next_to_the_real_file(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "base.toml").write_text("[train]\nseed = 5\n")
    (tmp_path / "real" / "child.toml").write_text('extends = "base.toml"\n')
    (tmp_path / "link.toml").symlink_to(tmp_path / "real" / "child.toml")
    assert load_config(tmp_path / "link.toml").train.seed == 5


@pytest.mark.parametrize(
    "text, message",
    [
        ('extends = "missing.toml"\n', r"missing\.toml: no such config file \(extended by .*a\.toml\)"),
        ('extends = "a.toml"\n', r"a\.toml: extends cycle"),
        ('extends = "c.toml"\n', r"a\.toml: extends cycle \(.*a\.toml -> .*c\.toml -> .*a\.toml\)"),
        ('extends = "./a.toml"\n', r"a\.toml: extends cycle"),  # the same file spelled differently
        ("extends = 3\n", r"a\.toml: extends must be a non-empty path string, got 3"),
        ('extends = ""\n', r"a\.toml: extends must be a non-empty path string"),
        ('extends = "sub"\n', r"sub: is a directory, not a config file \(extended by .*a\.toml\)"),
        ('extends = "list.json"\n', r"list\.json: expected a table of sections, got list"),
        ('extends = "b.toml"\n[train]\nlr = 1e-3\n', r"b\.toml: unknown key train\.lrr"),
    ],
)
def test_bad_extends_names_the_file(tmp_path, text, message):
    (tmp_path / "a.toml").write_text(text)
    (tmp_path / "b.toml").write_text("[train]\nlrr = 1\n")
    (tmp_path / "c.toml").write_text('extends = "a.toml"\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "a.toml")


def test_cli_rejects_bad_config_before_creating_the_run(synth, tmp_path, capsys):
    spec, sid = synth
    out = tmp_path / "run"
    rc = main(["--data", spec, "--sid", str(sid), "--out", str(out), "--set", "train.nope=1", "--quiet"])
    assert rc == 2 and not out.exists()
    assert "unknown key train.nope" in capsys.readouterr().err


def test_cli_rejects_a_table_for_another_catalog(synth, tmp_path, capsys):
    spec, _ = synth
    dataset = load_dataset(spec)
    other = tmp_path / "other.npz"
    ids = dataset.item_ids[:-1]
    SemanticIdTable(ids, np.arange(len(ids))[:, None] % 200, 200).save(other)
    out = tmp_path / "run"
    assert main(["--data", spec, "--sid", str(other), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "semantic-ID table does not match the dataset" in err and not out.exists()
    assert main(["--data", spec, "--sid", str(tmp_path / "nope.npz"), "--out", str(out), "--quiet"]) == 2
    assert "no such semantic-ID table" in capsys.readouterr().err
