"""The benchmark format: ``<Name>.txt.gz`` sequences + ``items.tsv.gz`` catalog (read and write).

This is the layout of the Amazon Beauty/Sports splits used by TIGER, P5 and S3-Rec (see
``SOURCE.md`` next to the data) and the layout every tool of this project writes, so real and
synthetic data go through one reader:

- ``<Name>.txt.gz``: one user per line, ``user item1 item2 ...``, oldest item first, whitespace
  separated. The ids are strings; they are what users of the project see.
- ``items.tsv.gz``: a tab-separated table with a header. ``item_id`` is required; the row order is
  the catalog order (item index = row number). Known columns are mapped to readable fields:
  ``text_keywords_idgenrec`` -> ``title``; ``attributes_s3rec`` (``brand | cat | subcat ...``) ->
  ``brand`` and ``categories``; ``asin`` and other ``*_id`` columns are identifiers, kept in
  ``item_meta`` so they are never embedded as text; any other column becomes a text field as is.

The S3-Rec attribute list puts the brand first *when the item has one*; some items list only
categories. We tell the two apart by looking at the whole catalog: a first attribute that also
occurs as a non-first attribute of some item is a category, otherwise it is the brand.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.data.dataset import DEFAULT_MAX_HISTORY, DataFormatError, SequenceDataset

ITEMS_FILE = "items.tsv.gz"
# files that sit next to the sequences in the shared data folders but are not the sequences
_NOT_SEQUENCE_FILES = ("user_sequence_asin.txt.gz", "item_textid_idgenrec.txt.gz")
_TITLE_COLUMN = "text_keywords_idgenrec"
_ATTRIBUTES_COLUMN = "attributes_s3rec"
_ATTRIBUTE_SEP = " | "
_META_COLUMNS = ("asin",)


def is_benchmark_dir(path: str | Path) -> bool:
    """True when ``path`` looks like a benchmark-format folder (items table + one sequence file)."""
    path = Path(path)
    return path.is_dir() and (path / ITEMS_FILE).is_file() and bool(_sequence_candidates(path))


def _sequence_candidates(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("*.txt.gz") if p.name not in _NOT_SEQUENCE_FILES)


def find_sequence_file(path: Path) -> Path:
    """The single ``<Name>.txt.gz`` of a benchmark folder (clear error when none or several)."""
    candidates = _sequence_candidates(path)
    if len(candidates) != 1:
        names = ", ".join(p.name for p in candidates) or "none"
        raise DataFormatError(path, None, f"expected exactly one <Name>.txt.gz sequence file, found {names}")
    return candidates[0]


def _read_text_lines(path: Path) -> list[str]:
    """All lines of a gzip text file (whole-file read: far faster than line-by-line for 1M rows)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            return fh.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, None, f"cannot read gzip text: {exc}") from exc


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic GC while building millions of small lists: it would rescan them all
    again and again (3x slower parsing) although none of them can form a cycle. Usable as a
    decorator (``@no_gc()``); nesting is safe, only the outermost use turns the GC back on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _is_meta_column(name: str) -> bool:
    return name in _META_COLUMNS or (name.endswith("_id") and name != "item_id")


def _split_attributes(rows: list[str]) -> tuple[list[str], list[str]]:
    """``brand | cat | ...`` strings -> (brand, ``cat | ...``), brand only where the catalog says so."""
    parts = [r.split(_ATTRIBUTE_SEP) for r in rows]
    category_names = {a for p in parts for a in p[1:]}
    brands = [p[0] if p[0] not in category_names else "" for p in parts]
    categories = [r[len(b) + len(_ATTRIBUTE_SEP) :] if b else r for r, b in zip(rows, brands, strict=True)]
    return brands, categories


def _first_duplicate(values: list[str]) -> tuple[int, int]:
    """(first index, repeated index) of the first value seen twice; only called when one exists."""
    seen: dict[str, int] = {}
    for i, v in enumerate(values):
        if v in seen:
            return seen[v], i
        seen[v] = i
    raise AssertionError("no duplicate")


def read_items_table(path: Path) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """Parse ``items.tsv.gz`` -> (item ids in catalog order, text fields, id-like meta fields)."""
    lines = _read_text_lines(path)
    if not lines:
        raise DataFormatError(path, 1, "empty file, expected a header starting with item_id")
    header = lines[0].split("\t")
    if "item_id" not in header:
        raise DataFormatError(path, 1, f"header has no item_id column: {header}")
    if len(set(header)) != len(header):
        raise DataFormatError(path, 1, f"duplicate column names in header: {header}")
    linenos = [n for n, line in enumerate(lines[1:], start=2) if line.strip()]
    rows = [lines[n - 1].split("\t") for n in linenos]
    if len(set(map(len, rows))) > 1 or (rows and len(rows[0]) != len(header)):
        bad = next(k for k, r in enumerate(rows) if len(r) != len(header))
        raise DataFormatError(
            path, linenos[bad], f"expected {len(header)} tab-separated columns, got {len(rows[bad])}"
        )
    columns = (
        {name: list(col) for name, col in zip(header, zip(*rows, strict=True), strict=True)} if rows else {}
    )
    columns = {name: columns.get(name, []) for name in header}
    item_ids = columns.pop("item_id")
    bad_ids = [k for k, iid in enumerate(item_ids) if not iid or " " in iid]
    if bad_ids:
        raise DataFormatError(
            path, linenos[bad_ids[0]], f"invalid item_id {item_ids[bad_ids[0]]!r} (empty or spaces)"
        )
    if len(set(item_ids)) != len(item_ids):
        first, again = _first_duplicate(item_ids)
        raise DataFormatError(
            path, linenos[again], f"duplicate item_id {item_ids[again]!r} (first on line {linenos[first]})"
        )
    fields: dict[str, list[str]] = {}
    meta: dict[str, list[str]] = {}
    for name, values in columns.items():
        if name == _TITLE_COLUMN:
            fields["title"] = values
        elif name == _ATTRIBUTES_COLUMN:
            fields["brand"], fields["categories"] = _split_attributes(values)
        elif _is_meta_column(name):
            meta[name] = values
        else:
            fields[name] = values
    return item_ids, fields, meta


def read_sequences(
    path: Path, item_index: dict[str, int], items_path: Path
) -> tuple[list[str], list[np.ndarray]]:
    """Parse ``<Name>.txt.gz`` into user ids and int64 item-index sequences (oldest first)."""
    lines = _read_text_lines(path)
    linenos = [n for n, line in enumerate(lines, start=1) if line and not line.isspace()]
    rows = [lines[n - 1].split() for n in linenos]
    short = [k for k, r in enumerate(rows) if len(r) < 2]
    if short:
        k = short[0]
        raise DataFormatError(
            path, linenos[k], f"user {rows[k][0]!r} has no items (expected 'user item1 item2 ...')"
        )
    user_ids = [r[0] for r in rows]
    if len(set(user_ids)) != len(user_ids):
        first, again = _first_duplicate(user_ids)
        raise DataFormatError(
            path, linenos[again], f"duplicate user {user_ids[again]!r} (first on line {linenos[first]})"
        )
    lengths = np.fromiter((len(r) - 1 for r in rows), dtype=np.int64, count=len(rows))
    flat = [t for r in rows for t in r[1:]]
    indices = list(map(item_index.get, flat))
    if None in indices:
        pos = indices.index(None)
        k = int(np.searchsorted(np.cumsum(lengths), pos, side="right"))
        raise DataFormatError(path, linenos[k], f"item {flat[pos]!r} is not in {items_path.name}")
    sequences = np.split(np.asarray(indices, dtype=np.int64), np.cumsum(lengths)[:-1]) if rows else []
    return user_ids, sequences


@no_gc()
def load_benchmark(path: str | Path, max_history: int = DEFAULT_MAX_HISTORY) -> SequenceDataset:
    """Load a benchmark-format folder; the dataset name is the stem of its ``<Name>.txt.gz``."""
    path = Path(path)
    if not path.is_dir():
        raise DataFormatError(path, None, "not a directory (expected <Name>.txt.gz + items.tsv.gz)")
    items_path = path / ITEMS_FILE
    if not items_path.is_file():
        raise DataFormatError(path, None, f"missing {ITEMS_FILE}")
    seq_path = find_sequence_file(path)
    item_ids, fields, meta = read_items_table(items_path)
    item_index = {iid: i for i, iid in enumerate(item_ids)}
    user_ids, sequences = read_sequences(seq_path, item_index, items_path)
    return SequenceDataset(
        name=seq_path.name[: -len(".txt.gz")],
        item_ids=item_ids,
        item_fields=fields,
        user_ids=user_ids,
        sequences=sequences,
        max_history=max_history,
        item_meta=meta,
        _item_index=item_index,
    )


# ---- writing -------------------------------------------------------------------------------------
def _clean(value: str) -> str:
    """Tabs and newlines would break the TSV; they carry no meaning in item text."""
    return " ".join(str(value).split())


def _check_token(kind: str, value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError(
            f"{kind} id {value!r} is empty or contains whitespace; the benchmark format cannot hold it"
        )
    return value


def _atomic_gzip_write(path: Path, lines: Iterator[str]) -> None:
    """Write gzip text to a temp file in the same folder, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz,
        ):
            buf: list[str] = []
            for line in lines:
                buf.append(line)
                if len(buf) >= 4096:
                    gz.write("".join(buf).encode("utf-8"))
                    buf.clear()
            gz.write("".join(buf).encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare_output_dir(out_dir: str | Path, name: str) -> Path:
    """Create ``out_dir`` for a dataset called ``name``; refuse a folder that holds another dataset
    (two sequence files would make the folder unreadable)."""
    out_dir = Path(out_dir)
    if not name or any(c.isspace() or c in "/\\" for c in name):
        raise ValueError(f"dataset name {name!r} cannot be a file name")
    out_dir.mkdir(parents=True, exist_ok=True)
    others = [p for p in _sequence_candidates(out_dir) if p.name != f"{name}.txt.gz"]
    if others:
        raise ValueError(
            f"{out_dir} already holds another sequence file ({others[0].name}); use an empty folder"
        )
    return out_dir


def item_table_columns(dataset: SequenceDataset) -> tuple[list[str], list[list[str]]]:
    """The ``items.tsv.gz`` header and its columns (aligned with ``item_ids``) for ``dataset``.

    ``title`` goes to ``text_keywords_idgenrec``, ``brand`` + ``categories`` to ``attributes_s3rec``,
    the ``asin`` meta to ``asin`` (``item_id`` when absent, as the real files always have one);
    other fields and meta become extra columns that ``load_benchmark`` reads back. Shared by
    ``write_benchmark`` and ``fair-data expand`` so both write the catalog the same way.
    """
    n = dataset.num_items
    fields = dataset.item_fields
    title = fields.get("title", [""] * n)
    brand = fields.get("brand", [""] * n)
    cats = fields.get("categories", [""] * n)
    attributes = [
        _ATTRIBUTE_SEP.join(a for a in (_clean(b), _clean(c)) if a) for b, c in zip(brand, cats, strict=True)
    ]
    extra_fields = {k: v for k, v in fields.items() if k not in ("title", "brand", "categories")}
    meta = dict(dataset.item_meta)
    asin = meta.pop("asin", dataset.item_ids)
    extra_meta = {(k if k.endswith("_id") else f"{k}_id"): v for k, v in meta.items()}
    clash = [
        k for k in extra_fields if _is_meta_column(k) or k in ("item_id", _TITLE_COLUMN, _ATTRIBUTES_COLUMN)
    ]
    if clash:
        raise ValueError(f"item field name(s) {clash} would be read back as identifiers; rename them")
    header = ["item_id", "asin", _TITLE_COLUMN, _ATTRIBUTES_COLUMN, *extra_fields, *extra_meta]
    columns = [dataset.item_ids, asin, title, attributes, *extra_fields.values(), *extra_meta.values()]
    return header, columns


@no_gc()
def write_benchmark(dataset: SequenceDataset, out_dir: str | Path, progress: bool = False) -> Path:
    """Write ``dataset`` as ``out_dir/<name>.txt.gz`` + ``out_dir/items.tsv.gz``; returns ``out_dir``.

    The catalog columns are those of ``item_table_columns``.
    """
    out_dir = prepare_output_dir(out_dir, dataset.name)
    name = dataset.name
    for iid in dataset.item_ids:
        _check_token("item", iid)
    header, columns = item_table_columns(dataset)
    n = dataset.num_items

    def item_lines() -> Iterator[str]:
        yield "\t".join(header) + "\n"
        for i in tqdm(range(n), desc="writing items", unit="item", disable=not progress):
            yield "\t".join(_clean(col[i]) for col in columns) + "\n"

    item_ids = dataset.item_ids

    def sequence_lines() -> Iterator[str]:
        users = zip(dataset.user_ids, dataset.sequences, strict=True)
        for user, seq in tqdm(
            users, desc="writing sequences", unit="user", total=dataset.num_users, disable=not progress
        ):
            if len(seq) == 0:
                continue  # the format has no way to say "a user with no items"
            yield _check_token("user", user) + " " + " ".join(item_ids[i] for i in seq.tolist()) + "\n"

    _atomic_gzip_write(out_dir / ITEMS_FILE, item_lines())
    _atomic_gzip_write(out_dir / f"{name}.txt.gz", sequence_lines())
    return out_dir
