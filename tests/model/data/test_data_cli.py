"""fair-data CLI, in process."""

from __future__ import annotations

import json

from model.data.cli import main


def test_synth_then_stats_json(tmp_path, capsys):
    out = tmp_path / "synth"
    assert (
        main(["synth", "--out", str(out), "--items", "200", "--users", "80", "--seed", "4", "--name", "Demo"])
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["Demo.txt.gz", "items.tsv.gz"]
    capsys.readouterr()
    assert main(["stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["name"] == "Demo" and stats["users"] == 80 and stats["items"] == 200
    assert stats["seq_len_min"] >= 5 and stats["seq_len_min"] <= stats["seq_len_mean"] <= stats["seq_len_max"]
    assert stats["interactions"] >= 5 * 80


def test_same_seed_writes_identical_files(tmp_path):
    for name in ("a", "b"):
        assert (
            main(["synth", "--out", str(tmp_path / name), "--items", "100", "--users", "30", "--seed", "1"])
            == 0
        )
    for f in ("Synthetic.txt.gz", "items.tsv.gz"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_convert_and_human_stats(tmp_path, capsys):
    assert main(["convert", "synthetic:items=60,users=20,seed=2", "--out", str(tmp_path)]) == 0
    assert main(["stats", str(tmp_path)]) == 0
    assert "interactions" in capsys.readouterr().out


def test_bad_input_is_one_line_error_and_nonzero(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fair-data: error:") and "nope" in err and "\n" not in err
