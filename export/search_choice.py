"""The served search, decided at export: the ``ann`` index built and measured, ``--search auto`` timed.

``--search ann``: the faiss index over the folded table is built here, and its recall of the exact
top-10 is measured on the export's sampled histories (real test histories with ``--data``) through
the network's ``history``, seen items excluded as served; both go into the manifest's ``search``.

``--search auto``: a catalog of up to ``MEASURE_ABOVE_ITEMS`` items is served ``exact`` without
measuring (it scores such a catalog in about a millisecond per user, and is exact). Above, every
candidate is timed on the sampled histories, one thread as the service runs: ``exact``, ``ann`` at each
nprobe of ``NPROBE_LADDER`` (one index, built once) and ``beam`` with the given ``candidates``; the
cheapest at batch 1 among those whose recall of the exact top-10 is at least ``MIN_RECALL10`` is
served. The timings, recalls and the choice are recorded under the manifest's ``search.auto``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from model.search.folded import FoldedScorer
from model.search.modes.ann import AnnMode, attach_index, build_index, recall_at_k
from model.search.modes.base import SearchMode
from model.search.modes.beam import BeamMode
from model.search.modes.exact import ExactMode
from model.semantic_ids.trie import CodeTrie

K = 10
MIN_RECALL10 = 0.98
MEASURE_ABOVE_ITEMS = 20_000
NPROBE_LADDER = (16, 32, 64, 128, 256)
TIMED_USERS_B1 = 64  # users timed one at a time (exact at 1M items: ~60 ms each)
BATCH = 32


@dataclass
class SearchChoice:
    """The served search and what the manifest's ``search`` entry adds to ``manifest_entry``: the
    index's parameters (``index``) and ``auto``'s measurements; ``index`` is the built faiss index."""

    mode: SearchMode
    entry: dict = field(default_factory=dict)
    index: Any = None


def _one_thread() -> threadpool_limits:
    import faiss

    faiss.omp_set_num_threads(1)
    return threadpool_limits(limits=1, user_api="blas")


def _ms_per_user(
    mode: SearchMode, scorer, trie, h, exclude, batch: int, users: int
) -> tuple[float, np.ndarray]:
    users = min(users, len(h))
    out = []
    start = time.perf_counter()
    for s in range(0, users, batch):
        out.append(mode.search(scorer, trie, (h[s : s + batch],), K, exclude[s : s + batch]).items)
    return 1000 * (time.perf_counter() - start) / max(users, 1), np.concatenate(out)


def measure(
    mode: SearchMode, scorer: FoldedScorer, trie: CodeTrie, h: np.ndarray, exclude: list, truth: np.ndarray
) -> dict:
    """One candidate's row: recall of ``truth`` (the exact top-10) and ms per user at batch 1 and 32."""
    b1, _ = _ms_per_user(mode, scorer, trie, h, exclude, 1, TIMED_USERS_B1)
    b32, items = _ms_per_user(mode, scorer, trie, h, exclude, BATCH, len(h))
    return {
        "mode": mode.name,
        **mode.settings(),
        "recall10": round(recall_at_k(items, truth), 4),
        "ms_per_user_b1": round(b1, 4),
        "ms_per_user_b32": round(b32, 4),
    }


def ann_index(
    scorer: FoldedScorer, h: np.ndarray, exclude: list, nprobe: int, truth=None
) -> tuple[Any, dict]:
    """Build the index over ``scorer`` (attached to it) and its manifest record: the build's parameters
    and the recall of the exact top-10 at ``nprobe`` on the histories ``h``."""
    index, info = build_index(scorer.table, scorer.bias)
    attach_index(scorer, index)
    with _one_thread():
        if truth is None:
            truth = ExactMode().search(scorer, None, (h,), K, exclude).items
        got = AnnMode(nprobe=nprobe).search(scorer, None, (h,), K, exclude).items
    return index, {
        **info,
        "nprobe": nprobe,
        "recall10": round(recall_at_k(got, truth), 4),
        "recall_users": len(h),
    }


def choose(
    requested: SearchMode | None,
    scorer: FoldedScorer,
    trie: CodeTrie,
    h: np.ndarray,
    histories: Sequence[np.ndarray],
    settings: Mapping[str, object] | None = None,
    measure_above: int = MEASURE_ABOVE_ITEMS,
) -> SearchChoice:
    """The served search: ``requested`` (an explicit ``--search``; ann gets its index built and measured)
    or, when None (``auto``), the measured choice described in the module docstring."""
    exclude = list(histories)
    settings = settings or {}
    if requested is not None:
        if not isinstance(requested, AnnMode):
            return SearchChoice(requested)
        index, info = ann_index(scorer, h, exclude, requested.nprobe)
        return SearchChoice(requested, {"index": info}, index)
    n = scorer.num_items
    if n <= measure_above:
        why = f"a catalog of {n:,} items (<= {measure_above:,}) is served exact, not measured"
        return SearchChoice(ExactMode(), {"auto": {"chosen": "exact", "why": why}})
    with _one_thread():
        truth = ExactMode().search(scorer, trie, (h,), K, exclude).items
        index, info = build_index(scorer.table, scorer.bias)
        attach_index(scorer, index)
        tried: list[SearchMode] = [ExactMode()]
        tried += [
            AnnMode.from_settings({**settings, "nprobe": p}) for p in NPROBE_LADDER if p <= info["nlist"]
        ]
        tried.append(BeamMode.from_settings(settings))
        rows = [measure(m, scorer, trie, h, exclude, truth) for m in tried]
    ok = [(row["ms_per_user_b1"], i) for i, row in enumerate(rows) if row["recall10"] >= MIN_RECALL10]
    best = tried[min(ok)[1]]  # exact always qualifies (recall 1)
    entry: dict = {
        "auto": {
            "chosen": best.describe(),
            "why": f"the fastest at batch 1 with recall@10 of exact >= {MIN_RECALL10} on {len(h)} histories",
            "min_recall10": MIN_RECALL10,
            "measured": rows,
        }
    }
    if isinstance(best, AnnMode):
        row = rows[tried.index(best)]
        entry["index"] = {**info, "nprobe": best.nprobe, "recall10": row["recall10"], "recall_users": len(h)}
        return SearchChoice(best, entry, index)
    return SearchChoice(best, entry)
