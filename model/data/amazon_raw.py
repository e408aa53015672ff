"""Raw Amazon 2014 review dumps (McAuley): ``reviews_<Cat>_5.json.gz`` + ``meta_<Cat>.json.gz``.

Turns the public dumps into a ``SequenceDataset`` the way the sequential-recommendation literature
does: drop repeated (user, item) reviews (the earliest one is kept), filter to the ``core``-core
iteratively (every user and every item keeps at least ``core`` interactions; removing a sparse item
can push a user under the bar, so repeat until nothing changes), then order each user's items by
review time (ties keep file order). Users are numbered in order of first review, items in order of
first appearance along the users' sequences, which is how P5/S3-Rec number them. Ids stay the
strings of the dump (reviewerID, ASIN).

Item text comes from the metadata: ``title``, ``brand``, ``categories`` (the list of category paths
flattened, duplicates dropped, joined by `` | ``) and ``price``. Metadata lines of the 2014 dumps
are often Python literals (single quotes) rather than JSON, so both are accepted.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from model.data.benchmark import no_gc
from model.data.dataset import DEFAULT_MAX_HISTORY, DataFormatError, SequenceDataset

_REVIEWS_GLOB = "reviews_*_5.json*"
_ASIN_IN_LINE = re.compile(r"""["']asin["']\s*:\s*["']([^"']+)["']""")
TEXT_FIELDS = ("title", "brand", "categories", "price")


def find_raw_files(path: str | Path) -> tuple[str, Path, Path]:
    """(category name, reviews file, meta file) of a raw dump folder; clear error when incomplete."""
    path = Path(path)
    reviews = sorted(p for p in path.glob(_REVIEWS_GLOB) if p.name.endswith((".json", ".json.gz")))
    if len(reviews) != 1:
        found = ", ".join(p.name for p in reviews) or "none"
        raise DataFormatError(path, None, f"expected exactly one reviews_<Cat>_5.json(.gz), found {found}")
    suffix = ".json.gz" if reviews[0].name.endswith(".gz") else ".json"
    category = reviews[0].name[len("reviews_") : -len("_5" + suffix)]
    for candidate in (path / f"meta_{category}.json.gz", path / f"meta_{category}.json"):
        if candidate.is_file():
            return category, reviews[0], candidate
    raise DataFormatError(path, None, f"found {reviews[0].name} but no meta_{category}.json(.gz) next to it")


def is_amazon_raw_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any(p.name.endswith((".json", ".json.gz")) for p in path.glob(_REVIEWS_GLOB))


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                line = line.strip()
                if line:
                    yield lineno, line
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, None, f"cannot read: {exc}") from exc


def _parse_record(path: Path, lineno: int, line: str) -> dict:
    """One dump line -> dict; strict JSON first, then a Python literal (the 2014 metadata style)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DataFormatError(path, lineno, "neither JSON nor a Python dict literal") from None
    if not isinstance(record, dict):
        raise DataFormatError(path, lineno, f"expected an object, got {type(record).__name__}")
    return record


def _read_reviews(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    users, items, times = [], [], []
    for lineno, line in _lines(path):
        record = _parse_record(path, lineno, line)
        try:
            user, item, time = record["reviewerID"], record["asin"], record["unixReviewTime"]
        except KeyError as exc:
            raise DataFormatError(path, lineno, f"missing field {exc.args[0]!r}") from None
        if not isinstance(user, str) or not user.strip() or not isinstance(item, str) or not item.strip():
            raise DataFormatError(path, lineno, "reviewerID and asin must be non-empty strings")
        try:
            times.append(int(time))
        except (TypeError, ValueError):
            raise DataFormatError(path, lineno, f"unixReviewTime {time!r} is not an integer") from None
        users.append(user.strip())
        items.append(item.strip())
    return users, items, np.asarray(times, dtype=np.int64)


def k_core(users: np.ndarray, items: np.ndarray, core: int) -> np.ndarray:
    """Boolean mask of interactions that survive iterative ``core``-core filtering (dense int codes)."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        u_count = np.bincount(users[keep], minlength=users.max(initial=-1) + 1)
        i_count = np.bincount(items[keep], minlength=items.max(initial=-1) + 1)
        new_keep = keep & (u_count[users] >= core) & (i_count[items] >= core)
        if new_keep.sum() == keep.sum():
            return keep
        keep = new_keep


def _text(value: object) -> str:
    return " ".join(str(value).split()) if value is not None else ""


def _categories(value: object) -> str:
    """``[["Beauty", "Makeup"], ["Beauty", "Nails"]]`` -> ``Beauty | Makeup | Nails``."""
    flat: list[str] = []
    stack = [value] if value is not None else []
    while stack:  # depth-first, keeping the written order
        v = stack.pop(0)
        if isinstance(v, list | tuple):
            stack[:0] = list(v)
        elif _text(v) and _text(v) not in flat:
            flat.append(_text(v))
    return " | ".join(flat)


def _price(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{float(value):.2f}"
    return _text(value)


def _read_meta(path: Path, wanted: dict[str, int]) -> dict[str, list[str]]:
    """Text fields for the wanted ASINs; lines of other items are skipped before parsing (speed)."""
    fields = {name: [""] * len(wanted) for name in TEXT_FIELDS}
    for lineno, line in _lines(path):
        match = _ASIN_IN_LINE.search(line)
        if match is not None and match.group(1) not in wanted:
            continue
        record = _parse_record(path, lineno, line)
        if "asin" not in record:
            raise DataFormatError(path, lineno, "missing field 'asin'")
        idx = wanted.get(str(record["asin"]).strip())
        if idx is None:
            continue
        fields["title"][idx] = _text(record.get("title"))
        fields["brand"][idx] = _text(record.get("brand"))
        fields["categories"][idx] = _categories(record.get("categories"))
        fields["price"][idx] = _price(record.get("price"))
    return fields


@no_gc()
def load_amazon_raw(
    path: str | Path, max_history: int = DEFAULT_MAX_HISTORY, core: int = 5
) -> SequenceDataset:
    """Load a raw dump folder as a ``core``-core, time-ordered ``SequenceDataset`` named ``<Cat>``."""
    category, reviews_path, meta_path = find_raw_files(path)
    users, items, times = _read_reviews(reviews_path)
    if not users:
        raise DataFormatError(reviews_path, None, "no reviews")
    user_names, user_codes = np.unique(np.asarray(users, dtype=object), return_inverse=True)
    item_names, item_codes = np.unique(np.asarray(items, dtype=object), return_inverse=True)

    # repeated (user, item) reviews: keep the earliest (ties: the first in the file)
    order = np.lexsort((np.arange(len(times)), times, item_codes, user_codes))
    pair = user_codes[order] * len(item_names) + item_codes[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair[1:] != pair[:-1]
    keep = np.zeros(len(order), dtype=bool)
    keep[order[first]] = True

    idx = np.flatnonzero(keep)
    idx = idx[k_core(user_codes[idx], item_codes[idx], core)]
    if len(idx) == 0:
        raise DataFormatError(reviews_path, None, f"no interactions survive {core}-core filtering")

    # users in order of first review; each user's items by time, ties in file order
    u, it, t = user_codes[idx], item_codes[idx], times[idx]
    _, first_seen = np.unique(u, return_index=True)
    user_rank = np.empty(u.max() + 1, dtype=np.int64)
    user_rank[np.unique(u)] = np.argsort(np.argsort(first_seen, kind="stable"), kind="stable")
    order = np.lexsort((idx, t, user_rank[u]))
    u, it = u[order], it[order]

    # items in order of first appearance along the ordered sequences
    seen_items, first_pos = np.unique(it, return_index=True)
    catalog = seen_items[np.argsort(first_pos, kind="stable")]
    dense = np.empty(it.max() + 1, dtype=np.int64)
    dense[catalog] = np.arange(len(catalog))
    boundaries = np.flatnonzero(np.diff(u)) + 1
    sequences = np.split(dense[it], boundaries)
    user_ids = [str(user_names[code]) for code in u[np.concatenate([[0], boundaries])]]
    item_ids = [str(item_names[code]) for code in catalog]

    fields = _read_meta(meta_path, {iid: i for i, iid in enumerate(item_ids)})
    return SequenceDataset(
        name=category,
        item_ids=item_ids,
        item_fields=fields,
        user_ids=user_ids,
        sequences=sequences,
        max_history=max_history,
        item_meta={"asin": list(item_ids)},
    )
