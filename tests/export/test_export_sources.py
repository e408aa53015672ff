"""fair-export's inputs: the popularity ranking is read by the bundle's one reader, with its rule."""

from __future__ import annotations

import numpy as np
import pytest

from export.bundle import BundleError, load_popular
from export.exporter import ExportFailed, load_sources


def test_an_empty_popularity_file_is_refused_by_the_export_as_by_the_bundle_reader(tiny_run, tmp_path):
    empty = tmp_path / "popular.npy"
    np.save(empty, np.zeros(0, dtype=np.int64))
    with pytest.raises(ExportFailed) as export_error:
        load_sources(run=tiny_run, popular=empty)
    with pytest.raises(BundleError) as bundle_error:
        load_popular(empty, 10)
    assert str(export_error.value) == str(bundle_error.value)
    assert "non-empty 1-d integer array" in str(export_error.value)


def test_the_run_s_popularity_file_is_read_as_int64_catalog_indices(tiny_run):
    src = load_sources(run=tiny_run)
    assert src.popular.dtype == np.int64
    assert src.popular.tolist() == np.load(tiny_run / "popular.npy").tolist()
