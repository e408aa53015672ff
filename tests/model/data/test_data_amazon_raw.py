"""Raw Amazon 2014 dumps: iterative 5-core filtering, time order, metadata text, errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from model.data import DataFormatError, load_dataset
from model.data.amazon_raw import load_amazon_raw


def write_lines(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def review(user: str, item: str, time: int) -> str:
    return json.dumps({"reviewerID": user, "asin": item, "unixReviewTime": time, "overall": 5.0})


def make_dump(tmp_path: Path) -> Path:
    """Users U1..U5 each review items I1..I5 (a 5-core block), written newest-first per user.

    U6 reviews I1..I4 and X (X has only U6): X falls out, then U6 has 4 items and falls out too
    (the cascade that makes the filter iterative). U1 reviews I3 twice: only the earliest counts.
    """
    lines = []
    for u in range(1, 6):
        for i in range(5, 0, -1):
            lines.append(review(f"U{u}", f"I{i}", 1000 + 10 * i + u))
    lines.append(review("U1", "I3", 5000))  # repeat of (U1, I3), later
    lines += [review("U6", f"I{i}", 2000 + i) for i in range(1, 5)] + [review("U6", "X", 2100)]
    lines.append(review("U2", "I1", 1012))  # exact-duplicate timestamp: ties keep file order
    write_lines(tmp_path / "reviews_Toys_5.json.gz", lines)
    write_lines(
        tmp_path / "meta_Toys.json.gz",
        [
            # Python-literal style, as in the 2014 metadata
            "{'asin': 'I1', 'title': 'Red  Kite', 'brand': 'Skyco', 'price': 12.5, "
            "'categories': [['Toys', 'Outdoor'], ['Toys', 'Kites']]}",
            json.dumps({"asin": "I2", "title": "Puzzle", "categories": [["Toys"]]}),
            json.dumps({"asin": "I3", "title": "Yo-yo", "brand": "Spin", "price": "$3.00"}),
            "{'asin': 'X', 'title': 'not kept'}",
            json.dumps({"asin": "I5", "title": "Doll"}),
            # I4 has no metadata at all: empty text, not an error
        ],
    )
    return tmp_path


def test_five_core_time_order_and_text(tmp_path):
    ds = load_dataset(make_dump(tmp_path))
    assert ds.name == "Toys"
    assert ds.user_ids == ["U1", "U2", "U3", "U4", "U5"]  # U6 dropped by the cascade
    assert ds.item_ids == ["I1", "I2", "I3", "I4", "I5"]  # first appearance along sequences; X dropped
    for seq in ds.sequences:
        assert seq.tolist() == [0, 1, 2, 3, 4]  # ordered by review time, repeat of I3 dropped
    assert ds.item_fields["title"] == ["Red Kite", "Puzzle", "Yo-yo", "", "Doll"]
    assert ds.item_fields["brand"] == ["Skyco", "", "Spin", "", ""]
    assert ds.item_fields["categories"][:2] == ["Toys | Outdoor | Kites", "Toys"]
    assert ds.item_fields["price"][:3] == ["12.50", "", "$3.00"]
    assert "I1" not in ds.item_texts()[0]


def test_core_is_configurable(tmp_path):
    ds = load_amazon_raw(make_dump(tmp_path), core=4)
    assert "U6" in ds.user_ids and "X" not in ds.item_ids
    assert [ds.item_ids[i] for i in ds.sequences[ds.user_ids.index("U6")]] == ["I1", "I2", "I3", "I4"]


def test_malformed_review_names_file_and_line(tmp_path):
    write_lines(
        tmp_path / "reviews_Toys_5.json.gz", [review("U1", "I1", 1), "{not json", review("U1", "I2", 2)]
    )
    write_lines(tmp_path / "meta_Toys.json.gz", [])
    with pytest.raises(DataFormatError, match=r"reviews_Toys_5\.json\.gz:2: neither JSON nor a Python dict"):
        load_dataset(tmp_path)
    write_lines(
        tmp_path / "reviews_Toys_5.json.gz", [review("U1", "I1", 1), json.dumps({"reviewerID": "U1"})]
    )
    with pytest.raises(DataFormatError, match=r"reviews_Toys_5\.json\.gz:2: missing field 'asin'"):
        load_dataset(tmp_path)


def test_malformed_meta_names_file_and_line(tmp_path):
    make_dump(tmp_path)
    write_lines(tmp_path / "meta_Toys.json.gz", ["{'asin': 'I1'}", "{'asin': 'I2', 'title': }"])
    with pytest.raises(DataFormatError, match=r"meta_Toys\.json\.gz:2:"):
        load_dataset(tmp_path)


def test_missing_meta_file(tmp_path):
    write_lines(tmp_path / "reviews_Toys_5.json.gz", [review("U1", "I1", 1)])
    with pytest.raises(DataFormatError, match="no meta_Toys.json"):
        load_dataset(tmp_path)
