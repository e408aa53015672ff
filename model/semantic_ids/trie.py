"""``CodeTrie``: every valid prefix of the catalog's semantic IDs, stored as flat arrays.

numpy only: the service loads it from a bundle (``trie.npz``) and must not import torch.

Layout (why: vectorised lookups over whole batches of beams, and a small, pickle-free file):

* Items are sorted lexicographically by their code tuple. A *node at level l* is a distinct prefix of
  length ``l`` (level 0 has one node, the root, id 0). Nodes of a level are numbered in sorted order.
* For each level ``l`` in ``0..L-1`` a CSR map from the nodes of level ``l`` to their children:
  ``indptr[l]`` (``[n_nodes(l) + 1]``) and ``child_codes[l]`` (``[n_nodes(l + 1)]``, the code at
  position ``l``, ascending within each node). The children of node ``p`` are the *edges*
  ``indptr[l][p] : indptr[l][p + 1]``.
* Because nodes are numbered in sorted order, edge ``e`` of level ``l`` leads to node ``e`` of level
  ``l + 1``: the child node ids are the edge positions themselves and need no array. At the last
  level the "child node" is the item: ``items[e]`` is the item index of leaf edge ``e``.

Memory: one int32 per edge plus one int32 per node per level (about 8 bytes per item per level:
~32 MB for 1M items with L=4). A dense ``[n_nodes, V]`` child table would need ``n_nodes * V``
entries: at level 3 of a 1M-item catalog that is ~1M * 256 * 4 B = 1 GB, so we do not build one.
Membership of a code under a node is a binary search on the sorted key ``parent * V + code``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FORMAT_VERSION = 1


class TrieError(ValueError):
    """Codes that cannot form a trie (duplicates, out of range) or trie arrays that are corrupt."""


@dataclass(eq=False)
class CodeTrie:
    """Valid prefixes of a set of unique code tuples, per level, as CSR arrays (see module docstring)."""

    codebook_size: int
    indptr: list[np.ndarray]  # per level l: int32 [n_nodes(l) + 1]
    child_codes: list[np.ndarray]  # per level l: int32 [n_nodes(l + 1)] (at l = L-1: [num_items])
    items: np.ndarray  # int64 [num_items]: item index of each leaf edge
    # lazily derived lookups (not saved): searchable edge keys, and ancestors / subtree sizes that the
    # beam search needs only when a request excludes items
    _edge_keys: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _ancestors: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _leaf_counts: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _leaf_of_item: np.ndarray | None = field(default=None, repr=False)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: np.ndarray, codebook_size: int) -> CodeTrie:
        """Build from ``codes`` ``[N, L]`` (row i = code tuple of item i, rows unique, values in [0, V))."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] < 1:
            raise TrieError(f"codes must be a 2-D [num_items, L] array with L >= 1, got shape {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise TrieError(f"codes must be integers, got dtype {codes.dtype}")
        n, length = codes.shape
        if codebook_size < 1:
            raise TrieError(f"codebook_size must be >= 1, got {codebook_size}")
        if n >= 2**31 - 1:
            raise TrieError(f"too many items for int32 node ids: {n}")
        if n and (codes.min() < 0 or codes.max() >= codebook_size):
            raise TrieError(f"codes must lie in [0, {codebook_size}), found [{codes.min()}, {codes.max()}]")
        codes = codes.astype(np.int64, copy=False)
        # np.lexsort sorts by the LAST key first, so pass the columns reversed: column 0 is primary.
        order = np.lexsort(codes.T[::-1]) if n else np.zeros(0, dtype=np.int64)
        srt = codes[order]

        indptr: list[np.ndarray] = []
        child_codes: list[np.ndarray] = []
        parent_of_item = np.zeros(n, dtype=np.int64)  # node id at the current level of each sorted item
        n_parent = 1
        starts = np.zeros(n, dtype=bool)  # True where a new prefix of the current length begins
        if n:
            starts[0] = True
        for level in range(length):
            starts[1:] |= srt[1:, level] != srt[:-1, level]
            first = np.flatnonzero(starts)  # first sorted item of each node at level + 1
            counts = np.bincount(parent_of_item[first], minlength=n_parent)
            indptr.append(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
            child_codes.append(srt[first, level].astype(np.int32))
            parent_of_item = np.cumsum(starts) - 1
            n_parent = len(first)
        if n_parent != n:
            dup = srt[np.flatnonzero(~starts)[0]]
            raise TrieError(f"codes are not unique: {n - n_parent} duplicate rows, e.g. {dup.tolist()}")
        return cls(codebook_size=int(codebook_size), indptr=indptr, child_codes=child_codes, items=order)

    # ---- persistence (np.savez-able, no pickle) ------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for ``np.savez``; ``from_arrays`` reads them back (``allow_pickle=False``)."""
        out: dict[str, np.ndarray] = {
            "format_version": np.asarray(FORMAT_VERSION, dtype=np.int64),
            "codebook_size": np.asarray(self.codebook_size, dtype=np.int64),
            "code_length": np.asarray(self.code_length, dtype=np.int64),
            "items": self.items,
        }
        for level in range(self.code_length):
            out[f"indptr_{level}"] = self.indptr[level]
            out[f"child_codes_{level}"] = self.child_codes[level]
        return out

    @classmethod
    def from_arrays(cls, arrays) -> CodeTrie:
        """Inverse of ``to_arrays`` (accepts a dict or an open ``np.load`` archive); checks consistency."""
        try:
            version = int(arrays["format_version"])
            if version != FORMAT_VERSION:
                raise TrieError(f"trie format version {version}, this code reads {FORMAT_VERSION}")
            length = int(arrays["code_length"])
            trie = cls(
                codebook_size=int(arrays["codebook_size"]),
                indptr=[np.asarray(arrays[f"indptr_{lv}"], dtype=np.int32) for lv in range(length)],
                child_codes=[np.asarray(arrays[f"child_codes_{lv}"], dtype=np.int32) for lv in range(length)],
                items=np.asarray(arrays["items"], dtype=np.int64),
            )
        except KeyError as exc:
            raise TrieError(f"trie arrays lack {exc}") from exc
        trie._validate()
        return trie

    def _validate(self) -> None:
        """Cheap structural checks so a corrupt trie.npz fails at load, not as an IndexError mid-request."""
        n_nodes = 1
        for level, (ptr, cc) in enumerate(zip(self.indptr, self.child_codes, strict=True)):
            if (
                ptr.shape != (n_nodes + 1,)
                or ptr[0] != 0
                or ptr[-1] != len(cc)
                or np.any(np.diff(ptr) < (1 if len(cc) else 0))
            ):
                raise TrieError(f"trie level {level}: indptr inconsistent with {n_nodes} nodes")
            if len(cc) and (cc.min() < 0 or cc.max() >= self.codebook_size):
                raise TrieError(f"trie level {level}: child codes outside [0, {self.codebook_size})")
            n_nodes = len(cc)
        if self.items.shape != (n_nodes,) or (
            n_nodes and not np.array_equal(np.sort(self.items), np.arange(n_nodes))
        ):
            raise TrieError(f"trie items must be a permutation of range({n_nodes})")

    # ---- shape ---------------------------------------------------------------------------------------
    @property
    def code_length(self) -> int:
        return len(self.indptr)

    @property
    def num_items(self) -> int:
        return len(self.items)

    def num_nodes(self, level: int) -> int:
        """Distinct prefixes of length ``level`` (1 at level 0; ``num_items`` at level ``L``)."""
        return len(self.indptr[level]) - 1 if level < self.code_length else self.num_items

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.indptr + self.child_codes) + self.items.nbytes)

    # ---- lookups -------------------------------------------------------------------------------------
    def children(self, level: int, node: int) -> tuple[np.ndarray, np.ndarray]:
        """(child codes, child node ids — item indices at the last level) of one node. Not for hot paths."""
        lo, hi = int(self.indptr[level][node]), int(self.indptr[level][node + 1])
        kids = self.items[lo:hi] if level == self.code_length - 1 else np.arange(lo, hi, dtype=np.int64)
        return self.child_codes[level][lo:hi].astype(np.int64), kids

    def _keys(self, level: int) -> np.ndarray:
        """Sorted ``parent * V + code`` per edge of ``level`` (ascending because nodes are in sorted order)."""
        keys = self._edge_keys.get(level)
        if keys is None:
            ptr = self.indptr[level]
            parent = np.repeat(np.arange(len(ptr) - 1, dtype=np.int64), np.diff(ptr))
            keys = parent * self.codebook_size + self.child_codes[level]
            self._edge_keys[level] = keys
        return keys

    def leaf_of_item(self) -> np.ndarray:
        """int64 ``[num_items]``: the leaf edge of each item (inverse of ``items``)."""
        if self._leaf_of_item is None:
            inverse = np.empty(self.num_items, dtype=np.int64)
            inverse[self.items] = np.arange(self.num_items)
            self._leaf_of_item = inverse
        return self._leaf_of_item

    def ancestors(self, level: int) -> np.ndarray:
        """int32 ``[num_items]``: for each leaf edge, its ancestor node at ``level`` (0..L).

        Cached: ~4 bytes per item per level, built on first use (exclusion handling in the search).
        """
        if level == self.code_length:
            return np.arange(self.num_items, dtype=np.int32)
        anc = self._ancestors.get(level)
        if anc is None:
            ptr = self.indptr[level]
            parent_of_edge = np.repeat(np.arange(len(ptr) - 1, dtype=np.int32), np.diff(ptr))
            anc = parent_of_edge[self.ancestors(level + 1)]
            self._ancestors[level] = anc
        return anc

    def leaf_counts(self, level: int) -> np.ndarray:
        """int64 ``[n_nodes(level)]``: how many items lie under each node of ``level``."""
        counts = self._leaf_counts.get(level)
        if counts is None:
            counts = np.bincount(self.ancestors(level), minlength=self.num_nodes(level)).astype(np.int64)
            self._leaf_counts[level] = counts
        return counts

    def step(self, level: int, nodes: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Vectorised child lookup: node ids at ``level + 1`` (item index at the last level), -1 if invalid.

        ``nodes`` and ``codes`` broadcast together; a node of -1 stays -1.
        """
        nodes, codes = np.broadcast_arrays(
            np.asarray(nodes, dtype=np.int64), np.asarray(codes, dtype=np.int64)
        )
        keys = self._keys(level)
        ok = (nodes >= 0) & (codes >= 0) & (codes < self.codebook_size)
        query = np.where(ok, nodes * self.codebook_size + codes, -1)
        if len(keys) == 0:
            return np.full(query.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
        found = ok & (keys[pos] == query)
        child = self.items[pos] if level == self.code_length - 1 else pos
        return np.where(found, child, -1).astype(np.int64)

    def lookup(self, codes: np.ndarray) -> np.ndarray:
        """Item index of each code tuple in ``codes`` ``[..., L]``, -1 for tuples that are not items."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.shape[-1] != self.code_length:
            raise TrieError(f"code tuples must have length {self.code_length}, got shape {codes.shape}")
        node = np.zeros(codes.shape[:-1], dtype=np.int64)
        for level in range(self.code_length):
            node = self.step(level, node, codes[..., level])
        return node
