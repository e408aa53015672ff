"""load_dataset: format detection and clear errors for what it cannot read."""

from __future__ import annotations

import pytest

from model.data import DataFormatError, detect_format, generate_synthetic, write_benchmark


def test_detects_each_format(tmp_path):
    bench = write_benchmark(generate_synthetic(50, 10, seed=0), tmp_path / "bench")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "reviews_Toys_5.json.gz").write_bytes(b"")
    generic = tmp_path / "generic"
    generic.mkdir()
    (generic / "interactions.parquet").write_bytes(b"")
    assert detect_format(bench) == "benchmark"
    assert detect_format(raw) == "amazon_raw"
    assert detect_format(generic) == "interactions"
    assert detect_format("synthetic:items=10") == "synthetic"


def test_unknown_layout_and_missing_path(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataFormatError, match="unknown dataset layout"):
        detect_format(tmp_path)
    with pytest.raises(DataFormatError, match="expected a dataset directory"):
        detect_format(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        detect_format(tmp_path / "missing")
