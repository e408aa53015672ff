"""Bring-your-own logs: ``interactions.{csv,parquet}`` + ``items.{csv,parquet}`` in one folder.

- interactions: columns ``user_id``, ``item_id`` and, optionally, ``timestamp`` (numbers, e.g. unix
  seconds, or ISO-8601 date-times; without it, file order is taken as time order). Each user's
  items are ordered by timestamp, ties in file order; users in order of first appearance. Repeated
  interactions are kept: re-buying is real behaviour and the logs are the user's to shape.
- items: ``item_id`` plus any text columns (title, brand, description, ...), which become the text
  fields the semantic IDs are built from; ``asin`` and other ``*_id`` columns are identifiers and are
  kept out of the embedded text (``item_meta``). Row order is the catalog order.

Every item of the interactions must be in the items file; errors name the file and line (CSV; the
header is line 1) or row (Parquet; 1-based).
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np

from model.data.benchmark import no_gc
from model.data.dataset import DEFAULT_MAX_HISTORY, DataFormatError, SequenceDataset

_SUFFIXES = (".csv", ".csv.gz", ".parquet")
_META_COLUMNS = ("asin",)


def find_table(path: Path, stem: str) -> Path | None:
    """``path/<stem>.csv|.csv.gz|.parquet`` (error when several exist), or None."""
    found = [path / f"{stem}{s}" for s in _SUFFIXES if (path / f"{stem}{s}").is_file()]
    if len(found) > 1:
        raise DataFormatError(
            path, None, f"several {stem} files, keep one: {', '.join(p.name for p in found)}"
        )
    return found[0] if found else None


def is_interactions_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / f"interactions{s}").is_file() for s in _SUFFIXES)


def _rows(path: Path, required: tuple[str, ...]) -> tuple[list[str], Iterator[tuple[int, list[object]]]]:
    """(column names, iterator of (line-or-row number, values)) for a CSV or Parquet table."""
    if path.name.endswith(".parquet"):
        return _parquet_rows(path, required)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        fh = opener(path, "rt", encoding="utf-8", newline="")
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise DataFormatError(path, 1, f"cannot read CSV header: {exc}") from exc
    _check_header(path, header, required)

    def rows() -> Iterator[tuple[int, list[object]]]:
        with fh:
            try:
                for values in reader:
                    if not values or (len(values) == 1 and not values[0].strip()):
                        continue
                    if len(values) != len(header):
                        raise DataFormatError(
                            path, reader.line_num, f"expected {len(header)} columns, got {len(values)}"
                        )
                    yield reader.line_num, values
            except (csv.Error, UnicodeDecodeError) as exc:
                raise DataFormatError(path, reader.line_num, f"malformed CSV: {exc}") from exc

    return header, rows()


def _parquet_rows(
    path: Path, required: tuple[str, ...]
) -> tuple[list[str], Iterator[tuple[int, list[object]]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pyarrow ships with the train extra
        raise DataFormatError(path, None, "reading Parquet needs pyarrow (pip install pyarrow)") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataFormatError(path, None, f"cannot read Parquet: {exc}") from exc
    header = list(table.column_names)
    _check_header(path, header, required)
    columns = [table.column(name).to_pylist() for name in header]
    return header, ((r + 1, [c[r] for c in columns]) for r in range(table.num_rows))


def _check_header(path: Path, header: list[str], required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise DataFormatError(path, 1, f"missing column(s) {missing}; columns are {header}")
    if len(set(header)) != len(header):
        raise DataFormatError(path, 1, f"duplicate column names: {header}")


def _id(path: Path, lineno: int, column: str, value: object) -> str:
    text = "" if value is None else str(value).strip()
    if not text or any(c.isspace() for c in text):
        raise DataFormatError(path, lineno, f"invalid {column} {value!r} (empty or contains whitespace)")
    return text


def _timestamp(path: Path, lineno: int, value: object) -> float:
    """Seconds as a float from a number, a datetime, or a numeric / ISO-8601 string."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = "" if value is None else str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise DataFormatError(path, lineno, f"timestamp {value!r} is neither a number nor ISO-8601") from None


def read_items(path: Path) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """(item ids in file order, text fields, id-like meta fields) of an items table."""
    header, rows = _rows(path, ("item_id",))
    id_col = header.index("item_id")
    item_ids: list[str] = []
    values: dict[str, list[str]] = {h: [] for h in header if h != "item_id"}
    seen: dict[str, int] = {}
    for lineno, row in rows:
        iid = _id(path, lineno, "item_id", row[id_col])
        if iid in seen:
            raise DataFormatError(path, lineno, f"duplicate item_id {iid!r} (first at {seen[iid]})")
        seen[iid] = lineno
        item_ids.append(iid)
        for name, v in zip(header, row, strict=True):
            if name != "item_id":
                values[name].append("" if v is None else " ".join(str(v).split()))
    fields = {k: v for k, v in values.items() if not (k in _META_COLUMNS or k.endswith("_id"))}
    meta = {k: v for k, v in values.items() if k not in fields}
    return item_ids, fields, meta


@no_gc()
def load_interactions(path: str | Path, max_history: int = DEFAULT_MAX_HISTORY) -> SequenceDataset:
    """Load a folder with an interactions table and an items table; the name is the folder's."""
    path = Path(path)
    inter_path = find_table(path, "interactions")
    items_path = find_table(path, "items")
    if inter_path is None or items_path is None:
        raise DataFormatError(path, None, "expected interactions.{csv,parquet} and items.{csv,parquet}")
    item_ids, fields, meta = read_items(items_path)
    item_index = {iid: i for i, iid in enumerate(item_ids)}

    header, rows = _rows(inter_path, ("user_id", "item_id"))
    u_col, i_col = header.index("user_id"), header.index("item_id")
    t_col = header.index("timestamp") if "timestamp" in header else None
    user_index: dict[str, int] = {}
    users, items, times = [], [], []
    for lineno, row in rows:
        user = _id(inter_path, lineno, "user_id", row[u_col])
        item = _id(inter_path, lineno, "item_id", row[i_col])
        if item not in item_index:
            raise DataFormatError(inter_path, lineno, f"item {item!r} is not in {items_path.name}")
        users.append(user_index.setdefault(user, len(user_index)))
        items.append(item_index[item])
        times.append(_timestamp(inter_path, lineno, row[t_col]) if t_col is not None else float(len(times)))
    if not users:
        raise DataFormatError(inter_path, None, "no interactions")

    u = np.asarray(users, dtype=np.int64)
    order = np.lexsort((np.arange(len(u)), np.asarray(times), u))  # by user, then time, then file order
    u, it = u[order], np.asarray(items, dtype=np.int64)[order]
    sequences = np.split(it, np.flatnonzero(np.diff(u)) + 1)
    return SequenceDataset(
        name=path.resolve().name,
        item_ids=item_ids,
        item_fields=fields,
        user_ids=list(user_index),
        sequences=sequences,
        max_history=max_history,
        item_meta=meta,
        _item_index=item_index,
    )
