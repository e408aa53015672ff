"""What the bench scripts print and save: a Markdown table of result rows (docs/benchmarks.md takes it
as it is) and the same rows as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def print_rows(rows: list[dict], title: str, json_path: Path | None = None) -> None:
    """``title``, then ``rows`` (dicts with the same keys, in column order) as a Markdown table; with
    ``json_path`` also ``{"where": title, "rows": rows}`` there."""
    cols = list(rows[0])
    print(f"\n{title}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    if json_path:
        json_path.write_text(json.dumps({"where": title, "rows": rows}, indent=2) + "\n")


def print_records(records: list[dict], as_json: bool, summary: dict | None = None) -> None:
    """The end of a run of cases: with ``as_json`` one JSON line (``summary`` if given, else the
    records), so ``tail -n 1`` reads it; otherwise one record per line."""
    if as_json:
        print(json.dumps(summary if summary is not None else records))
    else:
        for rec in records:
            print(rec)
