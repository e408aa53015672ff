"""``ann``: a faiss inner-product index over the folded table proposes candidates, rescored exactly.

The folded item score ``score(i) = h . table[i] + bias[i]`` (``model.search.folded``) is one inner
product once the bias rides along as an extra dimension: ``[h, 1] . [table[i], bias[i]]``. An IVF-Flat
index (``METRIC_INNER_PRODUCT``) over those ``[I, D + 1]`` vectors returns, per user, the ``candidates``
best items of the ``nprobe`` inverted lists nearest the query; they are rescored with the folded table
itself (``FoldedScorer.scores_of``, the same float32 arithmetic as ``exact``) and the top k kept.

Exclusions and k are handled as ``exact`` handles them: excluded items are never returned, and a user
gets ``min(k, catalog - excluded)`` items. The index does not know the exclusions, so each user asks for
``candidates`` plus the largest exclusion count of the batch; a user whose probed lists still leave too
few unseen candidates is searched again with four times the lists, up to every list (then the search is
complete: every item is a candidate). Chosen over HNSW because HNSW on the augmented inner product found
almost none of the exact top-10 (docs/model.md, "The served search", has the measurements).

The index lives beside the scorer (``attach_index``, which a bundle with an ``ann`` search does at load
time from its checksummed index file); a scorer without one gets an index built on first use with the
default parameters (offline evaluation). faiss is imported lazily: the training and export paths that
never rank with ``ann`` do not pay for it. numpy + faiss only: the service imports this, never torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from model.search.folded import FoldedScorer
from model.search.item_scores import Scorer
from model.search.modes.base import Param, RescoresCandidates, SearchConfigError, SearchMode
from model.search.modes.beam import BeamMode, rescore
from model.search.results import ExcludeArg, SearchResult, excluded_pairs
from model.semantic_ids.trie import CodeTrie

# 96 of ~4,000 lists probed: recall 0.99 of the exact top-10 on the 1M-item table of docs/model.md
# ("The served search"), where 64 gave 0.976
DEFAULT_NPROBE = 96
INDEX_TYPE = "IVF-Flat"
METRIC = "inner_product"
TRAIN_POINTS_PER_LIST = 32  # k-means sample: enough points per centroid, a bounded build at 1M items
KMEANS_ITERATIONS = 10
WIDEN_FACTOR = 4  # a user short of unseen candidates is searched again with this many times the lists
_INDEX_ATTR = "_ann_index"  # where attach_index keeps the index on the scorer


def default_nlist(num_items: int) -> int:
    """Inverted lists for a catalog: ~4 sqrt(I) (the usual IVF rule), but at least 39 items per list so
    k-means has points to train on (a 200-item catalog gets 5 lists)."""
    return max(1, min(round(4 * math.sqrt(num_items)), num_items // 39))


def augmented_table(table: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``[I, D + 1]`` float32 ``[table[i], bias[i]]``: the folded score as a plain inner product."""
    return np.ascontiguousarray(np.concatenate([table, bias[:, None]], axis=1), dtype=np.float32)


def augmented_queries(history: np.ndarray) -> np.ndarray:
    """``[B, D + 1]`` float32 ``[h, 1]``: the query side of ``augmented_table``."""
    ones = np.ones((history.shape[0], 1), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate([history, ones], axis=1), dtype=np.float32)


def build_index(
    table: np.ndarray, bias: np.ndarray, nlist: int | None = None, seed: int = 0
) -> tuple[Any, dict]:
    """An IVF-Flat inner-product index over the folded table, and what to record about it (type, nlist,
    dim, metric, build seconds). k-means trains on a seeded sample of ``TRAIN_POINTS_PER_LIST`` items per
    list (all items for small catalogs)."""
    import faiss

    vectors = augmented_table(table, bias)
    n, dim = vectors.shape
    nlist = default_nlist(n) if nlist is None else nlist
    if not 1 <= nlist <= n:
        raise SearchConfigError(f"nlist must lie in [1, {n}] for {n} items, got {nlist}")
    start = time.perf_counter()
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = KMEANS_ITERATIONS
    index.cp.seed = seed
    index.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
    index.cp.min_points_per_centroid = 1  # small samples are intended: no faiss warning about them
    rng = np.random.default_rng(seed)
    sample = min(n, TRAIN_POINTS_PER_LIST * nlist)
    train = vectors if sample == n else vectors[np.sort(rng.choice(n, size=sample, replace=False))]
    index.train(train)
    index.add(vectors)
    info = {
        "type": INDEX_TYPE,
        "nlist": int(nlist),
        "dim": int(dim),
        "metric": METRIC,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    return index, info


def check_index(index: Any, scorer: FoldedScorer) -> None:
    """Raise ``ValueError`` unless ``index`` is an inner-product IVF index over ``scorer``'s augmented
    table (item count and width)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError("the ann index must be an inner-product IVF index")
    if index.ntotal != scorer.num_items or index.d != scorer.dim + 1:
        raise ValueError(
            f"the ann index holds {index.ntotal} vectors of width {index.d}, the folded table "
            f"{scorer.num_items} of width {scorer.dim} (+1 for the bias)"
        )


def attach_index(scorer: FoldedScorer, index: Any) -> None:
    """Keep ``index`` (checked) with ``scorer``: ``ann`` searches on it from now on. Stored in the
    scorer's instance dict as ``functools.cached_property`` stores its values (the scorer is frozen)."""
    check_index(index, scorer)
    scorer.__dict__[_INDEX_ATTR] = index


def index_of(scorer: Scorer) -> Any:
    """The index ``ann`` searches for ``scorer``: the attached one, else one built now with the defaults
    and attached. Only the folded score is one inner product: other scorers are refused."""
    if not isinstance(scorer, FoldedScorer):
        raise SearchConfigError(
            f"search mode 'ann' needs the folded item score (a schema 3 bundle), got {type(scorer).__name__}"
        )
    index = scorer.__dict__.get(_INDEX_ATTR)
    if index is None:
        index, _ = build_index(scorer.table, scorer.bias)
        scorer.__dict__[_INDEX_ATTR] = index
    return index


@dataclass(frozen=True)
class AnnMode(RescoresCandidates, SearchMode):
    """IVF candidates (``candidates`` of them from ``nprobe`` lists), rescored by the folded score."""

    name: ClassVar[str] = "ann"
    help: ClassVar[str] = (
        "a faiss inner-product index over the folded table proposes candidates, rescored exactly"
    )
    params: ClassVar[tuple[Param, ...]] = (
        BeamMode.params[0],  # candidates: the same meaning (items rescored by the full score)
        Param("nprobe", DEFAULT_NPROBE, 1, "inverted lists of the ann index probed per user"),
    )

    candidates: int = BeamMode.params[0].default
    nprobe: int = DEFAULT_NPROBE

    def search(
        self,
        scorer: Scorer,
        trie: CodeTrie,
        outputs: Sequence[np.ndarray],
        k: int,
        exclude: ExcludeArg = None,
    ) -> SearchResult:
        self.check_k(k)
        index_of(scorer)  # a scorer ann cannot rank with is refused before its outputs are read
        outputs = scorer.check_outputs(*outputs)
        return rescore(scorer, outputs, self.propose(scorer, outputs[0], k, exclude), k)

    def propose(self, scorer: Scorer, history: np.ndarray, k: int, exclude: ExcludeArg = None) -> np.ndarray:
        """``[B, C]`` int64 candidate items per user (-1 = none), excluded items removed, at least
        ``min(k, catalog - excluded)`` real ones per user (see the module docstring)."""
        import faiss

        index = index_of(scorer)
        (h,) = scorer.check_outputs(history)
        n, batch = scorer.num_items, h.shape[0]
        users, items = excluded_pairs(exclude, batch, n)
        seen = np.bincount(users, minlength=batch)
        need = np.minimum(k, n - seen)
        width = min(n, self.candidates + int(seen.max(initial=0)))
        nlist = faiss.extract_index_ivf(index).nlist
        nprobe = min(self.nprobe, nlist)
        queries = augmented_queries(h)
        excluded_keys = users * n + items  # sorted (excluded_pairs): one searchsorted per lookup
        found = np.full((batch, width), -1, dtype=np.int64)
        rows = np.arange(batch)
        while True:
            _, got = index.search(queries[rows], width, params=faiss.SearchParametersIVF(nprobe=nprobe))
            got = got.astype(np.int64, copy=False)
            if excluded_keys.size:
                keys = rows[:, None] * n + np.maximum(got, 0)
                at = np.minimum(np.searchsorted(excluded_keys, keys), excluded_keys.size - 1)
                got = np.where((got >= 0) & (excluded_keys[at] == keys), -1, got)
            found[rows] = got
            short = (got >= 0).sum(axis=1) < need[rows]
            if not short.any() or nprobe >= nlist:
                return found
            rows, nprobe = rows[short], min(nlist, nprobe * WIDEN_FACTOR)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top-k items (``exact`` ``[B, k]``, -1 ignored) that ``approx`` ``[B, k]`` also
    returns: how an approximate search is measured against ``exact``."""
    hits = total = 0
    for a, e in zip(approx, exact, strict=True):
        e = e[e >= 0]
        total += e.size
        hits += np.isin(e, a[a >= 0]).sum()
    return float(hits / total) if total else 1.0
