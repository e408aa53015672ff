"""fair-export's --search: the chosen mode and its settings go into the manifest, the service's engine
reads them back, and a mode that cannot fill the verification's top 10 is refused before any write."""

from __future__ import annotations

import numpy as np

from export.bundle import load_bundle
from export.cli import main
from model.search.modes.beam import BeamMode
from service.engine import load_engine


def test_a_beam_export_records_its_candidates_and_is_served_with_them(tiny_run, tmp_path, capsys):
    out = tmp_path / "bundles"
    argv = [
        "--run",
        str(tiny_run),
        "--out",
        str(out),
        "--name",
        "b",
        "--search",
        "beam",
        "--candidates",
        "12",
    ]
    assert main(argv) == 0
    bundle = load_bundle(out / "b")
    assert bundle.manifest["search"] == {"mode": "beam", "candidates": 12, "nprobe": 96}
    assert bundle.search == BeamMode(candidates=12) and bundle.search_mode == "beam"
    checks = bundle.manifest["verification"]["fp32"]["checks"]
    assert "top-10 agreement through the served search (beam) against pytorch's item score" in checks

    engine = load_engine(out / "b", providers=["CPUExecutionProvider"])
    histories = [np.array([1, 2, 3]), np.array([4])]
    scores = engine.forward(histories)
    items, _ = engine.search(scores, beam_size=5, k=10, exclude=histories)  # the manifest's 12 win
    want = BeamMode(12).search(bundle.scorer, bundle.trie, scores.outputs, 10, histories)
    np.testing.assert_array_equal(items, want.items)
    wider, _ = engine.search(scores, beam_size=40, k=10, exclude=histories)  # a request widens the beam
    want = BeamMode(40).search(bundle.scorer, bundle.trie, scores.outputs, 10, histories)
    np.testing.assert_array_equal(wider, want.items)


def test_a_beam_too_narrow_for_the_top_10_is_refused_and_nothing_is_written(tiny_run, tmp_path, capsys):
    out = tmp_path / "bundles"
    argv = ["--run", str(tiny_run), "--out", str(out), "--search", "beam", "--candidates", "5"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fair-export: error: --search beam: candidates (5) must be >= k (10) (the verification ranks the top 10)"
    ]
    assert not out.exists()
