"""Generic logs: interactions + items as CSV or Parquet."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.data import DataFormatError, load_dataset

INTERACTIONS = [
    ("bob", "p2", "2024-01-02T10:00:00"),
    ("alice", "p1", "2024-01-01T09:00:00"),
    ("bob", "p1", "2024-01-01T08:00:00"),
    ("alice", "p3", "2024-01-01T09:00:00"),  # same time as alice/p1: file order breaks the tie
    ("alice", "p2", "2023-12-31T23:59:59"),
]
ITEMS = [("p1", "Trail shoe", "Acme", "X1"), ("p2", "Rain jacket", "Acme", "X2"), ("p3", "Sock", "", "X3")]


def write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def check(ds) -> None:
    assert ds.user_ids == ["bob", "alice"]  # order of first appearance
    assert ds.item_ids == ["p1", "p2", "p3"]  # items file order
    names = [[ds.item_ids[i] for i in s] for s in ds.sequences]
    assert names == [["p1", "p2"], ["p2", "p1", "p3"]]
    assert ds.item_fields == {"title": ["Trail shoe", "Rain jacket", "Sock"], "brand": ["Acme", "Acme", ""]}
    assert ds.item_meta == {"asin": ["X1", "X2", "X3"]}


def test_csv(tmp_path):
    write_csv(tmp_path / "interactions.csv", ["user_id", "item_id", "timestamp"], INTERACTIONS)
    write_csv(tmp_path / "items.csv", ["item_id", "title", "brand", "asin"], ITEMS)
    ds = load_dataset(tmp_path, max_history=4)
    check(ds)
    assert ds.name == tmp_path.name and ds.max_history == 4


def test_parquet_with_numeric_and_timestamp_types(tmp_path):
    users, items, times = zip(*INTERACTIONS, strict=True)
    stamps = pa.array(times).cast(pa.timestamp("s"))
    pq.write_table(
        pa.table({"user_id": users, "item_id": items, "timestamp": stamps}), tmp_path / "interactions.parquet"
    )
    ids, titles, brands, asins = zip(*ITEMS, strict=True)
    pq.write_table(
        pa.table({"item_id": ids, "title": titles, "brand": brands, "asin": asins}),
        tmp_path / "items.parquet",
    )
    check(load_dataset(tmp_path))


def test_without_timestamp_file_order_is_time_order(tmp_path):
    write_csv(tmp_path / "interactions.csv", ["user_id", "item_id"], [("u", "p3"), ("u", "p1"), ("u", "p3")])
    write_csv(tmp_path / "items.csv", ["item_id", "title", "brand", "asin"], ITEMS)
    ds = load_dataset(tmp_path)
    assert ds.sequences[0].tolist() == [2, 0, 2]  # repeats are kept


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ([("u", "p1", "1"), ("u", "nope", "2")], r"interactions\.csv:3: item 'nope' is not in items\.csv"),
        ([("u", "p1", "1"), ("u", "p2", "yesterday")], r"interactions\.csv:3: timestamp 'yesterday'"),
        ([("u", "p1", "1"), ("", "p2", "2")], r"interactions\.csv:3: invalid user_id"),
        ([("u", "p1", "1"), ("u", "p2")], r"interactions\.csv:3: expected 3 columns, got 2"),
    ],
)
def test_bad_interactions_name_file_and_line(tmp_path, rows, pattern):
    write_csv(tmp_path / "interactions.csv", ["user_id", "item_id", "timestamp"], rows)
    write_csv(tmp_path / "items.csv", ["item_id", "title", "brand", "asin"], ITEMS)
    with pytest.raises(DataFormatError, match=pattern):
        load_dataset(tmp_path)


def test_bad_items_name_file_and_line(tmp_path):
    write_csv(tmp_path / "interactions.csv", ["user_id", "item_id", "timestamp"], [("u", "p1", "1")])
    write_csv(tmp_path / "items.csv", ["item_id", "title"], [("p1", "a"), ("p1", "b")])
    with pytest.raises(DataFormatError, match=r"items\.csv:3: duplicate item_id 'p1' \(first at 2\)"):
        load_dataset(tmp_path)
    write_csv(tmp_path / "items.csv", ["id", "title"], [("p1", "a")])
    with pytest.raises(DataFormatError, match=r"items\.csv:1: missing column\(s\) \['item_id'\]"):
        load_dataset(tmp_path)


def test_parquet_error_names_the_row(tmp_path):
    pq.write_table(
        pa.table({"user_id": ["u", "u"], "item_id": ["p1", "zz"]}), tmp_path / "interactions.parquet"
    )
    write_csv(tmp_path / "items.csv", ["item_id", "title"], [("p1", "a")])
    with pytest.raises(DataFormatError, match=r"interactions\.parquet:2: item 'zz'"):
        load_dataset(tmp_path)
