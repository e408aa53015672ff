"""Fractal (Kronecker) expansion of a real dataset into a large one with the same degree shapes.

No public sequential data set reaches our users' scale (1M-10M items, 10M+ events), so we grow a
real one, after Belletti et al. 2019 ("Scalable Realistic Recommendation Datasets through Fractal
Expansions", the method behind HSTU's ML-3B): the user x item matrix ``R`` (``m x n``) becomes
``W (x) R``, the Kronecker product with a small seeded *reduced matrix* ``W`` (``K_u x K_i``).
Expanded user ``(a, u)`` is copy ``a`` of user ``u``; expanded item ``(b, i)`` is copy (variant)
``b`` of item ``i``. The counts are whole multiples: ``K_i * n`` items, ``K_u * m`` users,
``K_u * |R|`` interactions, with ``K_i = ceil(items / n)`` and
``K_u = max(ceil(users / m), ceil(interactions / |R|))``.

Our data are sequences, so the product is taken per event rather than per matrix entry:

- **Sequence rule.** Expanded user ``(a, u)`` replays user ``u``'s history in the same order and
  with the same length; its ``t``-th event is a copy of ``u``'s ``t``-th item. So the history
  length distribution is exactly the original one, every user ``K_u`` times, and nothing that
  depends on order (recency, leave-one-out targets) moves.
- **Which copy.** Row ``a`` of ``W`` says which item copies user copy ``a`` may meet: ``W`` is the
  interval-overlap matrix of two partitions of a circle, ``K_u`` arcs for the user copies (in a
  seeded order) against ``K_i`` arcs for the item copies (with a seeded rotation), so each row is a
  window of ``K_i / K_u`` consecutive variants and every column gets the same total weight
  ``K_u / K_i`` (a row-stochastic ``W``; the paper uses a dense reduced matrix and Bernoulli
  draws, which would change history lengths). Within the window, the copy of an event is fixed by
  the event's seeded rank among all events of its item: item ``i``'s ``K_u * pop(i)`` expanded
  events take the ``K_u * pop(i)`` evenly spaced points of the circle, each exactly once. Hence
  **every copy of item ``i`` gets ``floor`` or ``ceil`` of ``pop(i) * K_u / K_i`` events**: the
  item popularity distribution is the original one scaled by ``K_u / K_i``, up to rounding, and
  with Beauty's 5-core every copy has at least 3 events.
- **Text.** Every copy keeps the original's text and attributes (title, brand, categories) and gets a
  ``variant`` text column (the copy number), so no two items have the same text (their embeddings
  still lie close: see docs/data.md on semantic-ID collisions); ``source_item_id`` (an identifier,
  never embedded) maps a copy back.

What it does to the next-item task: the original item of every expanded target is exactly the
original target (copies of a user share it), and the copy lies in the user's window of
``ceil(K_i / K_u) + 1`` or fewer variants, visible in the history's ``variant`` tokens; which variant in
the window is pseudo-random (the event's rank), so exact-item accuracy is bounded by the original
accuracy divided by about the window size. It is a benchmark for scale (catalog size, throughput,
memory), not a new quality benchmark; each original history appears ``K_u`` times (with different
variants), which for training works like ``K_u`` epochs of the original data.

Everything is computed with numpy; each seeded choice (rotation, user-copy order, event ranks) has
its own ``numpy.random.default_rng([seed, k])``; files are gzip with
``mtime=0``, so the same arguments give byte-identical output. The output is written in chunks (one
user copy at a time): memory holds the original dataset, a few arrays of its size and the item-id
strings of the expanded catalog, never per-user objects of the expanded data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.data.benchmark import (
    ITEMS_FILE,
    _atomic_gzip_write,
    _check_token,
    _clean,
    item_table_columns,
    no_gc,
    prepare_output_dir,
)
from model.data.dataset import SequenceDataset
from model.data.loading import load_dataset

VARIANT_COLUMN = "variant"
SOURCE_COLUMN = "source_item_id"
EXPANSION_FILE = "expansion.json"
INTERACTIONS_PER_ITEM = 10  # default --interactions = 10 x --items: our users' catalogs' ratio


@dataclass(frozen=True)
class ExpansionPlan:
    """The factors and seeded choices of one expansion (written to ``expansion.json``)."""

    source_items: int
    source_users: int
    source_interactions: int
    item_factor: int  # K_i: copies of every item
    user_factor: int  # K_u: copies of every user
    seed: int
    rotation: int  # seeded rotation of the item-copy arcs, in copies (0 <= rotation < K_i)

    @property
    def items(self) -> int:
        return self.item_factor * self.source_items

    @property
    def users(self) -> int:
        return self.user_factor * self.source_users

    @property
    def interactions(self) -> int:
        return self.user_factor * self.source_interactions


def plan_expansion(
    source: SequenceDataset,
    items: int,
    users: int | None = None,
    interactions: int | None = None,
    seed: int = 0,
) -> ExpansionPlan:
    """Smallest whole factors that reach the asked counts; ``users`` defaults to ``items`` and
    ``interactions`` to ``10 x items`` (our users' shape). Asking for less than the source has is
    an error: the expansion only grows."""
    m = source.num_users
    n = source.num_items
    e = int(sum(len(s) for s in source.sequences))
    if m == 0 or n == 0 or e == 0:
        raise ValueError(f"{source.name}: nothing to expand ({m} users, {n} items, {e} interactions)")
    users = items if users is None else users
    interactions = INTERACTIONS_PER_ITEM * items if interactions is None else interactions
    for flag, asked, have, what in (
        ("--items", items, n, "items"),
        ("--users", users, m, "users"),
        ("--interactions", interactions, e, "interactions"),
    ):
        if asked < have:
            raise ValueError(
                f"{flag} {asked} is below the source's {have} {what}: the expansion only grows a dataset "
                f"(use {flag} >= {have})"
            )
    k_i = math.ceil(items / n)
    k_u = max(math.ceil(users / m), math.ceil(interactions / e))
    rotation = int(np.random.default_rng([seed, 1]).integers(k_i))
    return ExpansionPlan(n, m, e, k_i, k_u, seed, rotation)


def reduced_matrix(plan: ExpansionPlan) -> np.ndarray:
    """``W [K_u, K_i]``: row ``a`` is the share of user copy ``a``'s events that go to each item copy.

    Row-stochastic, every column sums to ``K_u / K_i``. This is the expectation of what
    ``copy_of_events`` does; the tests check one against the other."""
    k_u, k_i = plan.user_factor, plan.item_factor
    window = _user_copy_windows(plan)
    # item-copy arc b covers [(b - rotation) mod K_i, ... + 1) / K_i of [0, 1); the user arc of
    # window w covers [w, w + 1) / K_u. Work in units of 1 / (K_u K_i) so all ends are integers.
    w = np.zeros((k_u, k_i))
    for a in range(k_u):
        lo, hi = window[a] * k_i, (window[a] + 1) * k_i
        for b in range(k_i):
            start = ((b - plan.rotation) % k_i) * k_u
            w[a, b] = max(0, min(hi, start + k_u) - max(lo, start))
    return w / k_i


def _user_copy_windows(plan: ExpansionPlan) -> np.ndarray:
    """Which arc of the circle each user copy gets (a seeded permutation of ``0..K_u-1``)."""
    return np.random.default_rng([plan.seed, 2]).permutation(plan.user_factor)


@dataclass(frozen=True)
class _Events:
    """The source's events, flat: item index, its rank among the item's events, the item's count."""

    items: np.ndarray  # [E] int64
    rank: np.ndarray  # [E] int64, seeded order of the item's events, 0..pop(item)-1
    pop: np.ndarray  # [E] int64, pop(item) of each event
    lengths: np.ndarray  # [m] int64, history length per user


def _source_events(source: SequenceDataset, seed: int) -> _Events:
    lengths = np.fromiter((len(s) for s in source.sequences), dtype=np.int64, count=source.num_users)
    items = np.concatenate([np.asarray(s, dtype=np.int64) for s in source.sequences])
    pop = np.bincount(items, minlength=source.num_items)
    keys = np.random.default_rng([seed, 3]).random(len(items))
    order = np.lexsort((keys, items))  # grouped by item, seeded order inside each group
    starts = np.concatenate([[0], np.cumsum(pop)[:-1]])
    rank = np.empty(len(items), dtype=np.int64)
    rank[order] = np.arange(len(items)) - starts[items[order]]
    return _Events(items=items, rank=rank, pop=pop[items], lengths=lengths)


def copy_of_events(plan: ExpansionPlan, events: _Events, user_copy: int) -> np.ndarray:
    """Item copy (``0..K_i-1``) of every source event, as replayed by user copy ``user_copy``.

    Item ``i``'s events over all user copies are the slots ``s = window * pop(i) + rank``, i.e.
    ``0..K_u * pop(i) - 1`` each once; slot ``s`` sits at ``(s + 1/2) / (K_u pop(i))`` on the
    circle, and the copy is the (rotated) arc of ``K_i`` it falls in. Integer arithmetic only."""
    window = int(_user_copy_windows(plan)[user_copy])
    total = plan.user_factor * events.pop
    slot = window * events.pop + events.rank
    return ((2 * slot + 1) * plan.item_factor // (2 * total) + plan.rotation) % plan.item_factor


def _copy_id(source_id: str, copy: int) -> str:
    """``<source id>-<copy>``: unique, since the copy number (digits) is what follows the last ``-``."""
    return f"{source_id}-{copy}"


@no_gc()
def expand_dataset(
    data: str | Path,
    out: str | Path,
    items: int,
    users: int | None = None,
    interactions: int | None = None,
    seed: int = 0,
    name: str | None = None,
    progress: bool = False,
) -> dict[str, object]:
    """Expand the dataset at ``data`` (anything ``load_dataset`` reads) into the benchmark folder
    ``out``; returns what ``expansion.json`` records (plan, counts, output files)."""
    source = load_dataset(data)
    plan = plan_expansion(source, items, users, interactions, seed)
    name = name or f"{source.name}Expanded"
    header, columns = item_table_columns(source)
    for clash in (VARIANT_COLUMN, SOURCE_COLUMN):
        if clash in header:
            raise ValueError(f"{data}: the source already has a {clash!r} item column; expand adds its own")
    for iid in source.item_ids:
        _check_token("item", iid)
    for uid in source.user_ids:
        _check_token("user", uid)
    out_dir = prepare_output_dir(out, name)
    events = _source_events(source, seed)
    n, k_i, k_u = plan.source_items, plan.item_factor, plan.user_factor

    # item rows: everything after item_id is the same for all copies but the variant number
    rows = ["\t".join(_clean(col[i]) for col in columns[1:]) for i in range(n)]

    def item_lines() -> Iterator[str]:
        yield "\t".join([*header, VARIANT_COLUMN, SOURCE_COLUMN]) + "\n"
        for b in tqdm(range(k_i), desc="writing items", unit="copy", disable=not progress):
            tail = f"\t{b}\t"
            yield "".join(
                f"{_copy_id(iid, b)}\t{row}{tail}{iid}\n"
                for iid, row in zip(source.item_ids, rows, strict=True)
            )

    # the expanded catalog is copy-major: index b * n + i is copy b of item i
    copy_ids = [_copy_id(iid, b) for b in range(k_i) for iid in source.item_ids]
    ends = np.cumsum(events.lengths).tolist()
    starts = [0, *ends[:-1]]

    def sequence_lines() -> Iterator[str]:
        for a in tqdm(range(k_u), desc="writing sequences", unit="user copy", disable=not progress):
            tokens = [copy_ids[j] for j in (copy_of_events(plan, events, a) * n + events.items).tolist()]
            yield "".join(
                f"{_copy_id(uid, a)} {' '.join(tokens[s:e])}\n"
                for uid, s, e in zip(source.user_ids, starts, ends, strict=True)
                if e > s  # the format cannot hold a user without items
            )

    _atomic_gzip_write(out_dir / ITEMS_FILE, item_lines())
    _atomic_gzip_write(out_dir / f"{name}.txt.gz", sequence_lines())
    report: dict[str, object] = {
        "method": "fractal expansion (Kronecker product with a seeded interval reduced matrix), "
        "sequence-preserving",
        "source": source.name,
        "source_fingerprint": source.fingerprint(),
        **asdict(plan),
        "items": plan.items,
        "users": k_u * int((events.lengths > 0).sum()),
        "interactions": plan.interactions,
        "files": [ITEMS_FILE, f"{name}.txt.gz"],
    }
    (out_dir / EXPANSION_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
