"""Benchmark format (``<Name>.txt.gz`` + ``items.tsv.gz``): loading, errors with file:line, writing."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from model.data import DataFormatError, SequenceDataset, load_benchmark, write_benchmark

HEADER = "item_id\tasin\ttext_keywords_idgenrec\tattributes_s3rec"


def write_gz(path: Path, text: str) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(text)


def make_dir(
    tmp_path: Path, items: list[str], sequences: list[str], name: str = "Tiny", header: str = HEADER
) -> Path:
    write_gz(tmp_path / "items.tsv.gz", "\n".join([header, *items]) + "\n")
    write_gz(tmp_path / f"{name}.txt.gz", "\n".join(sequences) + "\n")
    return tmp_path


ITEMS = [
    "1\tB001\tred nail polish\tOPI | Makeup | Nails",
    "2\tB002\tblue nail polish\tOPI | Makeup | Nails",
    "3\tB003\tface cream\tMakeup | Face",  # no brand: "Makeup" is a category elsewhere
    "4\tB004\tnever seen item\tAcme | Skin Care",
]


def test_loads_ids_fields_and_sequences_in_file_order(tmp_path):
    make_dir(tmp_path, ITEMS, ["u1 1 2 3", "u2 3 1", "u3 2 3 1 2"])
    # files that sit next to the real data are not taken for the sequences
    write_gz(tmp_path / "user_sequence_asin.txt.gz", "A1 B001\n")
    ds = load_benchmark(tmp_path, max_history=7)

    assert ds.name == "Tiny"
    assert ds.max_history == 7
    assert ds.item_ids == ["1", "2", "3", "4"]  # catalog order = items.tsv order, unseen item kept
    assert ds.user_ids == ["u1", "u2", "u3"]
    assert [s.tolist() for s in ds.sequences] == [[0, 1, 2], [2, 0], [1, 2, 0, 1]]
    assert all(s.dtype == np.int64 for s in ds.sequences)
    assert ds.item_fields["title"] == ["red nail polish", "blue nail polish", "face cream", "never seen item"]
    assert ds.item_fields["brand"] == ["OPI", "OPI", "", "Acme"]
    assert ds.item_fields["categories"] == ["Makeup | Nails", "Makeup | Nails", "Makeup | Face", "Skin Care"]
    assert ds.item_meta == {"asin": ["B001", "B002", "B003", "B004"]}


def test_asin_is_not_part_of_the_embedded_text(tmp_path):
    ds = load_benchmark(make_dir(tmp_path, ITEMS, ["u1 1 2 3"]))
    texts = ds.item_texts()
    assert texts[0] == "title: red nail polish; brand: OPI; categories: Makeup | Nails"
    assert not any("B00" in t for t in texts)


def test_unknown_item_names_file_and_line(tmp_path):
    make_dir(tmp_path, ITEMS, ["u1 1 2 3", "", "u2 3 99 1"])
    with pytest.raises(DataFormatError, match=r"Tiny\.txt\.gz:3: item '99' is not in items\.tsv\.gz"):
        load_benchmark(tmp_path)


@pytest.mark.parametrize(
    ("items", "sequences", "pattern"),
    [
        (
            ITEMS[:2] + ["3\tB003\tonly three columns"],
            ["u1 1"],
            r"items\.tsv\.gz:4: expected 4 tab-separated columns, got 3",
        ),
        (
            ITEMS[:2] + ["1\tB009\tagain\tX"],
            ["u1 1"],
            r"items\.tsv\.gz:4: duplicate item_id '1' \(first on line 2\)",
        ),
        (ITEMS[:1] + ["\tB009\tno id\tX"], ["u1 1"], r"items\.tsv\.gz:3: invalid item_id"),
        (ITEMS, ["u1 1 2", "u2"], r"Tiny\.txt\.gz:2: user 'u2' has no items"),
        (ITEMS, ["u1 1 2", "u2 1", "u1 3"], r"Tiny\.txt\.gz:3: duplicate user 'u1' \(first on line 1\)"),
    ],
)
def test_malformed_input_names_file_and_line(tmp_path, items, sequences, pattern):
    make_dir(tmp_path, items, sequences)
    with pytest.raises(DataFormatError, match=pattern):
        load_benchmark(tmp_path)


def test_header_without_item_id_is_rejected(tmp_path):
    make_dir(tmp_path, ["1\tx"], ["u1 1"], header="id\ttitle")
    with pytest.raises(DataFormatError, match=r"items\.tsv\.gz:1: header has no item_id"):
        load_benchmark(tmp_path)


def test_missing_or_ambiguous_sequence_file(tmp_path):
    write_gz(tmp_path / "items.tsv.gz", HEADER + "\n" + ITEMS[0] + "\n")
    with pytest.raises(DataFormatError, match="found none"):
        load_benchmark(tmp_path)
    write_gz(tmp_path / "A.txt.gz", "u1 1\n")
    write_gz(tmp_path / "B.txt.gz", "u1 1\n")
    with pytest.raises(DataFormatError, match="A.txt.gz, B.txt.gz"):
        load_benchmark(tmp_path)


def test_not_gzip_is_a_clear_error(tmp_path):
    make_dir(tmp_path, ITEMS, ["u1 1"])
    (tmp_path / "Tiny.txt.gz").write_text("u1 1\n")
    with pytest.raises(DataFormatError, match=r"Tiny\.txt\.gz: cannot read gzip text"):
        load_benchmark(tmp_path)


def test_write_then_load_round_trip_keeps_extra_fields_and_meta(tmp_path):
    ds = SequenceDataset(
        name="Shop",
        item_ids=["a", "b", "c"],
        item_fields={
            "title": ["soft\tpillow", "warm blanket", "lamp"],  # a tab would break the TSV: it is cleaned
            "brand": ["Zed", "", "Zed"],
            "categories": ["Home | Bed", "Home | Bed", "Home"],
            "price": ["9.99", "", "20.00"],
        },
        user_ids=["x", "y"],
        sequences=[np.array([0, 1, 2]), np.array([2, 0])],
        item_meta={"asin": ["A1", "A2", "A3"], "sku": ["s1", "s2", "s3"]},
    )
    out = write_benchmark(ds, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["Shop.txt.gz", "items.tsv.gz"]
    back = load_benchmark(out)
    assert back.name == "Shop"
    assert back.item_ids == ds.item_ids and back.user_ids == ds.user_ids
    assert [s.tolist() for s in back.sequences] == [[0, 1, 2], [2, 0]]
    assert back.item_fields == {**ds.item_fields, "title": ["soft pillow", "warm blanket", "lamp"]}
    assert back.item_meta == {"asin": ["A1", "A2", "A3"], "sku_id": ["s1", "s2", "s3"]}


def test_write_refuses_ids_the_format_cannot_hold(tmp_path):
    ds = SequenceDataset(
        name="Bad", item_ids=["a b"], item_fields={}, user_ids=["u"], sequences=[np.array([0])]
    )
    with pytest.raises(ValueError, match="whitespace"):
        write_benchmark(ds, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
