"""Items added without retraining: stored in Redis, applied by every worker within a second.

``POST /admin/items {item_id, text}`` (service/api/admin_items.py) gives an item the served bundle does
not know what a cold catalog item has (service/new_item_encoder.py: its semantic ID from the bundle's
own text encoder and quantizer, its folded row from the per-level code tables, its input vector) and
makes it part of the catalog every worker ranks: recommendable, and understood in histories.

Redis (one hash-tagged slot per bundle NAME, so every script is one-slot on a Cluster; nothing expires):

* ``fair:newitem:{NAME}:items``: hash item id -> JSON ``{text, seq, added_at}``, the source of truth;
* ``fair:newitem:{NAME}:version``: a counter, incremented by every add and delete (an add's ``seq``);
* ``fair:newitem:{NAME}:emb:{ENCODER}``: hash item id -> the text embedding by the encoder ``ENCODER``
  (``new_item_encoder.encoder_key``), so no worker and no restart embeds a text twice, and a new bundle
  version with the same encoder reuses them (the codes and rows are recomputed: its quantizer and
  model may differ).

An add or a delete is one Lua script (the record, the counter and the embedding together: nothing
half-applied). Every worker polls the counter every ``SYNC_INTERVAL_S`` (0.5 s: one GET) and, when
it moved or the served engine changed (a reload), rebuilds its catalog: the stored items in ``seq``
order, minus those the bundle has itself (the bundle's version wins), each given the smallest free
collision code of its prefix (same order, same codes in every worker), appended to the bundle's rows.
A restart restores them the same way before the first request.

The catalog is extended in a new ``Engine`` (``ExtendedEngine``) swapped in whole, as a reload swaps,
so a request in flight keeps the engine it started with. Its arrays are views of buffers with spare
rows (``Catalog``): an add appends rows that no earlier view sees; anything else (a delete, a change of
order) writes fresh buffers. Search: the bundle's own mode over the bundle's items (its trie, its ann
index) and the new items scored exactly (``h @ rows``), merged into the top k: new items are never
missed by a beam or an index that was built without them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

from export.bundle import LoadedBundle, has_item_encoder
from model.search.folded import FoldedScorer
from model.search.modes.ann import attach_index
from model.semantic_ids.collisions import CollisionError
from model.semantic_ids.table import SemanticIdTable
from service.engine import Engine, ModelScores
from service.errors import ServiceError, unavailable
from service.new_item_encoder import (
    ItemEncoder,
    ItemEncoderError,
    NewItemRows,
    NoItemEncoder,
    PrefixIndex,
    assign_codes,
    encoder_key,
)
from service.redis_calls import REDIS_UNAVAILABLE
from service.redis_store import REDIS_FAILURES, async_client
from service.state import AppState

log = logging.getLogger("fair.new_items")

KEY_PREFIX = "fair:newitem:"
SYNC_INTERVAL_S = 0.5  # how often a worker checks for items added elsewhere
MAX_NEW_ITEMS = 10_000  # items added per bundle name (each is scored exactly on every request)
MAX_TEXT_CHARS = 4_000  # the encoder reads at most max_seq_length tokens (MiniLM: 256) anyway
SPARE_ROWS = 1_024  # rows the catalog buffers keep free for adds without a copy
_INDEX_ATTR = "_ann_index"  # where model.search.modes.ann.attach_index keeps a scorer's index

# KEYS items, version, embeddings. ARGV id, text, added_at, max items, embedding JSON.
# -> {1, record} added, {0, record} already there (nothing written), {-1, ""} full.
_ADD = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then return {0, current} end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return {-1, ''} end
local seq = redis.call('INCR', KEYS[2])
local record = cjson.encode({text = ARGV[2], added_at = ARGV[3], seq = seq})
redis.call('HSET', KEYS[1], ARGV[1], record)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
return {1, record}
"""
# KEYS items, version, embeddings. ARGV id. -> 1 deleted, 0 no such new item.
_DELETE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('INCR', KEYS[2])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""
# KEYS items, embeddings. ARGV id, embedding JSON, ...: embeddings of items that still exist.
_STORE_EMBEDDINGS = """
for i = 1, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
end
return 1
"""


@dataclass(frozen=True)
class Keys:
    """The Redis keys of one bundle name's new items (one hash tag: one Cluster slot)."""

    items: str
    version: str
    base: str

    @classmethod
    def of(cls, name: str) -> Keys:
        safe = name.isprintable() and "{" not in name and "}" not in name and len(name) <= 128
        tag = name if safe else hashlib.sha256(name.encode()).hexdigest()[:16]
        base = f"{KEY_PREFIX}{{{tag}}}"
        return cls(f"{base}:items", f"{base}:version", base)

    def embeddings(self, encoder: str) -> str:
        return f"{self.base}:emb:{encoder}"


@dataclass(frozen=True)
class NewItemRecord:
    item_id: str
    text: str
    seq: int
    added_at: str

    @classmethod
    def parse(cls, item_id: str, raw: str) -> NewItemRecord:
        d = json.loads(raw)
        return cls(item_id, str(d["text"]), int(d["seq"]), str(d["added_at"]))


@dataclass(frozen=True)
class ItemStatus:
    """Where a stored item stands in this worker: ``served`` (with its semantic ID), ``in_bundle`` (the
    served bundle has an item of that id: the bundle's version wins), or ``not_served`` (``reason``)."""

    status: str
    semantic_id: tuple[int, ...] | None = None
    reason: str | None = None


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pack(text: str, embedding: np.ndarray) -> str:
    raw = np.ascontiguousarray(embedding, dtype="<f4").tobytes()
    return json.dumps({"text": text_digest(text), "e": base64.b64encode(raw).decode()})


def _unpack(raw: str | None, text: str, dim: int) -> np.ndarray | None:
    """The stored embedding of ``text`` (None when absent, for another text or malformed)."""
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        e = np.frombuffer(base64.b64decode(d["e"]), dtype="<f4").astype(np.float32)
    except (ValueError, KeyError, TypeError):
        return None
    if d.get("text") != text_digest(text) or e.shape != (dim,) or not np.isfinite(e).all():
        return None
    return e


# ---- the extended catalog ---------------------------------------------------------------------------
class Catalog:
    """The rows of one loaded bundle in buffers with ``spare`` free rows after them, from which every
    extended engine of that bundle takes its views (module docstring). The bundle's own rows
    ``[0, base_items)`` never change; ``written`` lists the new items whose rows follow them."""

    def __init__(self, engine: Engine, spare: int = SPARE_ROWS):
        b = engine.bundle
        if not isinstance(b.scorer, FoldedScorer):
            raise ItemEncoderError("new items need the folded item score (a schema 4 bundle)")
        self.session, self.provider = engine.session, engine.provider
        self.max_history, self.loaded_at = engine.max_history, engine.loaded_at
        self.base_items = b.table.num_items
        self.base_index = b.table.index_of()
        self.item_ids = b.table.item_ids
        self._heads = b.scorer.heads
        self._index = b.scorer.__dict__.get(_INDEX_ATTR)
        # the bundle over the buffers (set by _allocate): nothing here keeps the loaded bundle's own
        # [I, D] arrays alive once the engine that holds them is replaced
        self._template = b
        self._allocate(self.base_items + spare, b.table.codes, b.scorer.table, b.scorer.bias, b.item_inputs)
        self.spare = spare

    def _allocate(self, capacity: int, codes, table, bias, inputs) -> None:
        """Fresh buffers holding the bundle's rows (views of earlier buffers stay as they are)."""
        n = self.base_items
        self.codes = np.empty((capacity, codes.shape[1]), dtype=np.int64)
        self.table = np.empty((capacity, table.shape[1]), dtype=np.float32)
        self.bias = np.empty(capacity, dtype=np.float32)
        self.codes[:n], self.table[:n], self.bias[:n] = codes[:n], table[:n], bias[:n]
        self.inputs = None
        if inputs is not None:
            self.inputs = np.empty((capacity, inputs.shape[1]), dtype=np.float32)
            self.inputs[:n] = inputs[:n]
        self.base_scorer = FoldedScorer(self.codes[:n], self.table[:n], self.bias[:n], self._heads)
        if self._index is not None:  # the bundle's ann index, over exactly these rows
            attach_index(self.base_scorer, self._index)
        self.written: list[str] = []
        b = self._template
        table = SemanticIdTable(
            self.item_ids, self.codes[:n], b.table.codebook_size, b.table.meta, b.table.quantizer
        )
        table._index = self.base_index
        self._template = replace(b, table=table, scorer=self.base_scorer, item_inputs=self._base_inputs())
        self.prefixes = PrefixIndex(self.codes[:n], b.table.codebook_size)

    @property
    def capacity(self) -> int:
        return int(self.codes.shape[0])

    def _holds(self, ids: Sequence[str], rows: NewItemRows) -> bool:
        """Whether the buffers already hold ``ids``' first rows as ``rows`` has them (then only the
        rest is appended)."""
        w, n = len(self.written), self.base_items
        if w > len(ids) or list(ids[:w]) != self.written:
            return False
        same = np.array_equal(self.codes[n : n + w], rows.codes[:w])
        same = same and np.array_equal(self.table[n : n + w], rows.table[:w])
        same = same and np.array_equal(self.bias[n : n + w], rows.bias[:w])
        if self.inputs is not None and rows.inputs is not None:
            same = same and np.array_equal(self.inputs[n : n + w], rows.inputs[:w])
        return bool(same)

    def extend(self, ids: Sequence[str], rows: NewItemRows) -> ExtendedEngine:
        """An engine over the bundle's items followed by ``ids`` (rows ``rows``)."""
        n, m = self.base_items, len(ids)
        start = len(self.written)
        if n + m > self.capacity or not self._holds(ids, rows):
            self._allocate(
                max(self.capacity, n + m + self.spare), self.codes, self.table, self.bias, self.inputs
            )
            start = 0
        end = n + m
        self.codes[n + start : end] = rows.codes[start:]
        self.table[n + start : end] = rows.table[start:]
        self.bias[n + start : end] = rows.bias[start:]
        if self.inputs is not None:
            self.inputs[n + start : end] = rows.inputs[start:] if rows.inputs is not None else 0.0
        self.written = list(ids)
        b = self._template
        table = SemanticIdTable(
            [*self.item_ids, *ids], self.codes[:end], b.table.codebook_size, b.table.meta, b.table.quantizer
        )
        table._index = {**self.base_index, **{item: n + j for j, item in enumerate(ids)}}
        scorer = FoldedScorer(self.codes[:end], self.table[:end], self.bias[:end], self.base_scorer.heads)
        inputs = self.inputs[:end] if self.inputs is not None else None
        bundle = replace(b, table=table, scorer=scorer, item_inputs=inputs)
        return ExtendedEngine(
            bundle=bundle,
            session=self.session,
            provider=self.provider,
            max_history=self.max_history,
            loaded_at=self.loaded_at,
            catalog=self,
            new_ids=tuple(ids),
        )

    def base_engine(self) -> Engine:
        """The bundle alone again (every new item gone), over the buffers' bundle rows."""
        return Engine(self._template, self.session, self.provider, self.max_history, self.loaded_at)

    def _base_inputs(self) -> np.ndarray | None:
        return None if self.inputs is None else self.inputs[: self.base_items]


@dataclass
class ExtendedEngine(Engine):
    """An ``Engine`` whose catalog is the bundle's items followed by new items (``new_ids``, indices
    from ``catalog.base_items`` on). ``forward`` and the item lookups work unchanged on the extended
    bundle; ``search`` runs the bundle's mode over the bundle's items and scores the new ones exactly."""

    catalog: Catalog | None = None
    new_ids: tuple[str, ...] = field(default=())

    def search(
        self, scores: ModelScores, beam_size: int, k: int, exclude: Sequence[np.ndarray | None] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self.catalog is not None
        b, base, n = self.bundle, self.catalog.base_scorer, self.catalog.base_items
        mode = b.search.at_least(max(beam_size, k))
        own = None if exclude is None else [None if e is None else e[e < n] for e in exclude]
        result = mode.search(base, b.trie, scores.outputs, k, own)
        (h,) = base.check_outputs(*scores.outputs)
        scorer = b.scorer
        assert isinstance(scorer, FoldedScorer)
        new_scores = h @ scorer.table[n:].T + scorer.bias[n:]  # [B, m]
        if exclude is not None:
            for user, e in enumerate(exclude):
                if e is not None:
                    new_scores[user, e[e >= n] - n] = -np.inf
        return merge_top_k(result.items, result.scores, new_scores, n, k)


def merge_top_k(
    items: np.ndarray, scores: np.ndarray, new_scores: np.ndarray, first_new: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of a search's ``items``/``scores`` ``[B, k']`` and the new items' scores ``[B, m]``
    (item ``first_new + j``), best first; -1 / -inf where fewer than k items are left."""
    batch, m = new_scores.shape
    new_items = np.broadcast_to(np.arange(first_new, first_new + m, dtype=np.int64), (batch, m))
    all_items = np.concatenate([np.asarray(items, dtype=np.int64), new_items], axis=1)
    all_scores = np.concatenate([np.asarray(scores, dtype=np.float32), new_scores.astype(np.float32)], axis=1)
    all_scores = np.where(all_items >= 0, all_scores, -np.inf).astype(np.float32)
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    top_items = np.take_along_axis(all_items, order, axis=1)
    top_scores = np.take_along_axis(all_scores, order, axis=1)
    top_items = np.where(np.isneginf(top_scores), -1, top_items)
    if top_items.shape[1] < k:  # fewer candidates than k in all
        pad = k - top_items.shape[1]
        top_items = np.pad(top_items, ((0, 0), (0, pad)), constant_values=-1)
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return top_items, top_scores


# ---- the worker's registry ----------------------------------------------------------------------------
@dataclass
class _Build:
    engine: Engine  # what to serve
    statuses: dict[str, ItemStatus]


class NewItems:
    """One worker's view of the new items: the Redis copy, the engine that serves them, the sync loop."""

    def __init__(self, state: AppState):
        self.state = state
        self.client: Any = None
        self.version: int | None = None  # the Redis counter the served engine reflects
        self.records: dict[str, NewItemRecord] = {}
        self.statuses: dict[str, ItemStatus] = {}
        self._served: Engine | None = None  # the engine this registry last put in place
        self._catalog: Catalog | None = None
        self._encoder: ItemEncoder | None = None
        self._embeddings: dict[tuple[str, str], tuple[str, np.ndarray]] = {}  # (encoder, id) -> (text, e)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._scripts: dict[str, Any] = {}
        self._last_error_log = -60.0
        self.last_sync: float | None = None  # monotonic time of the last successful sync

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect (a small pool of its own: the history traffic's slots stay the traffic's), restore
        the stored items into the served engine, then follow changes every ``SYNC_INTERVAL_S``."""
        s = self.state.settings
        url = s.redis_url or (self.state.embedded.url if self.state.embedded is not None else None)
        if url is None:
            return
        self.client = async_client(url, s.redis_cluster, s.redis_timeout_ms / 1000.0, max_connections=2)
        with contextlib.suppress(ServiceError):  # Redis down at startup: the loop keeps trying
            await self.sync()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.client is not None:
            with contextlib.suppress(*REDIS_FAILURES):
                await self.client.aclose()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            try:
                await self.sync()
            except Exception as exc:  # logged at most once a minute; the next tick tries again
                # a WARNING: a Redis outage itself is logged (once, as an ERROR) by the history store
                now = time.monotonic()
                if now - self._last_error_log >= 60:
                    self._last_error_log = now
                    log.warning("new items: sync failed (retrying every %.1f s): %s", SYNC_INTERVAL_S, exc)

    # ---- Redis ---------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _redis(self) -> AsyncIterator[Any]:
        if self.client is None:
            raise unavailable("redis_unavailable", REDIS_UNAVAILABLE, "redis_unavailable")
        try:
            yield self.client
        except REDIS_FAILURES as exc:  # not logged per call: the sync loop every 0.5 s would flood the log
            raise unavailable("redis_unavailable", REDIS_UNAVAILABLE, "redis_unavailable") from exc

    async def _script(self, name: str, source: str, keys: list[str], args: list[Any]) -> Any:
        async with self._redis() as client:
            return await client.eval(source, len(keys), *keys, *args)

    def _keys(self, engine: Engine) -> Keys:
        return Keys.of(engine.name)

    # ---- sync ----------------------------------------------------------------------------------------
    @staticmethod
    def _catalog_of(engine: Engine) -> Catalog | None:
        """The catalog buffers an extended engine was built from (None: the bundle alone)."""
        return engine.catalog if isinstance(engine, ExtendedEngine) else None

    async def sync(self, force: bool = False) -> None:
        """Make the served engine hold exactly the stored items (module docstring); cheap when the
        counter did not move and the engine is the one this registry put in place."""
        async with self._lock:
            while True:
                engine = self.state.engine
                if engine is None:
                    return
                keys = self._keys(engine)
                async with self._redis() as client:
                    raw_version = await client.get(keys.version)
                version = int(raw_version or 0)
                current = engine is self._served
                if not force and current and version == self.version:
                    self.last_sync = time.monotonic()
                    return
                async with self._redis() as client:
                    raw = await client.hgetall(keys.items)
                records = sorted(
                    (NewItemRecord.parse(item, value) for item, value in raw.items()), key=lambda r: r.seq
                )
                build = await self._build(engine, keys, records)
                if self.state.engine is not engine:  # a reload swapped meanwhile: build on the new one
                    continue
                self.records = {r.item_id: r for r in records}
                self.statuses = build.statuses
                if build.engine is not engine:
                    self.state.engine = build.engine
                self._served = build.engine
                self.version = version
                self.last_sync = time.monotonic()
                return

    async def _build(self, engine: Engine, keys: Keys, records: list[NewItemRecord]) -> _Build:
        """The engine serving ``records`` on ``engine``'s bundle, and each record's status."""
        catalog = self._catalog_of(engine)
        bundle = engine.bundle
        if catalog is not None:
            base_index, base_items = catalog.base_index, catalog.base_items
        else:
            base_index, base_items = bundle.table.index_of(), bundle.table.num_items
        statuses: dict[str, ItemStatus] = {}
        wanted = []
        for r in records:
            at = base_index.get(r.item_id)
            if at is not None and at < base_items:
                statuses[r.item_id] = ItemStatus("in_bundle")
            else:
                wanted.append(r)
        if not wanted:
            served = catalog.base_engine() if catalog is not None else engine
            return _Build(served, statuses)
        try:
            encoder = await self._encoder_for(bundle)
        except ItemEncoderError as exc:
            for r in wanted:
                statuses[r.item_id] = ItemStatus("not_served", reason=str(exc))
            served = catalog.base_engine() if catalog is not None else engine
            return _Build(served, statuses)
        embeddings = await self._embeddings_of(encoder, keys, wanted)
        if catalog is None:
            catalog = await asyncio.to_thread(Catalog, engine)
        served_engine, statuses_new = await asyncio.to_thread(
            self._extend, catalog, encoder, wanted, embeddings
        )
        statuses.update(statuses_new)
        return _Build(served_engine, statuses)

    @staticmethod
    def _extend(
        catalog: Catalog, encoder: ItemEncoder, records: list[NewItemRecord], embeddings: np.ndarray
    ) -> tuple[Engine, dict[str, ItemStatus]]:
        """Codes (in ``seq`` order), rows, and the extended engine; an item whose prefix is full is
        left out (status ``not_served``)."""
        prefixes = encoder.prefixes(embeddings)
        codes, ok = assign_codes(prefixes, catalog.prefixes)
        statuses = {}
        for r, fits in zip(records, ok, strict=True):
            if not fits:
                statuses[r.item_id] = ItemStatus("not_served", reason="its semantic-ID prefix is full")
        keep = np.flatnonzero(ok)
        ids = [records[i].item_id for i in keep]
        if not ids:
            return catalog.base_engine(), statuses
        rows = encoder.rows(codes[keep], embeddings[keep])
        engine = catalog.extend(ids, rows)
        for item, code in zip(ids, rows.codes, strict=True):
            statuses[item] = ItemStatus("served", tuple(int(c) for c in code))
        return engine, statuses

    async def _encoder_for(self, bundle: LoadedBundle) -> ItemEncoder:
        """The served bundle's item encoder (parts read now; its ONNX session on the first ``embed``)."""
        enc = self._encoder
        if enc is not None and enc.dir == bundle.dir and enc.version == bundle.version:
            return enc
        if not has_item_encoder(bundle.manifest):
            raise NoItemEncoder(
                f"bundle {bundle.name} v{bundle.version} has no item encoder: export it with "
                "fair-export --item-encoder to add items without retraining"
            )
        enc = await asyncio.to_thread(ItemEncoder.load, bundle)
        self._encoder = enc
        return enc

    async def _embeddings_of(
        self, encoder: ItemEncoder, keys: Keys, records: list[NewItemRecord]
    ) -> np.ndarray:
        """``[N, E]``: each record's embedding from this worker's cache, else Redis, else the encoder
        (then written back for the other workers)."""
        out = np.empty((len(records), encoder.dim), dtype=np.float32)
        missing = []
        for i, r in enumerate(records):
            cached = self._embeddings.get((encoder.key, r.item_id))
            if cached is not None and cached[0] == r.text:
                out[i] = cached[1]
            else:
                missing.append(i)
        if missing:
            async with self._redis() as client:
                raw = await client.hmget(keys.embeddings(encoder.key), [records[i].item_id for i in missing])
            still = []
            for i, value in zip(missing, raw, strict=True):
                e = _unpack(value, records[i].text, encoder.dim)
                if e is None:
                    still.append(i)
                else:
                    out[i] = e
                    self._embeddings[(encoder.key, records[i].item_id)] = (records[i].text, e)
            if still:
                computed = await asyncio.to_thread(encoder.embed, [records[i].text for i in still])
                args: list[str] = []
                for i, e in zip(still, computed, strict=True):
                    out[i] = e
                    self._embeddings[(encoder.key, records[i].item_id)] = (records[i].text, e)
                    args += [records[i].item_id, _pack(records[i].text, e)]
                await self._script(
                    "store", _STORE_EMBEDDINGS, [keys.items, keys.embeddings(encoder.key)], args
                )
        return out

    # ---- the admin operations ----------------------------------------------------------------------
    async def add(self, item_id: str, text: str) -> tuple[NewItemRecord, ItemStatus, bool]:
        """Store a new item and serve it in this worker before answering; ``(record, status, created)``.
        Raises ``ServiceError`` (409 for what the item or bundle does not allow, 503 for Redis / no model)
        with nothing stored."""
        engine = self.state.serving()
        base_items = (
            engine.catalog.base_items if isinstance(engine, ExtendedEngine) and engine.catalog else None
        )
        at = engine.item_index.get(item_id)
        if at is not None and (base_items is None or at < base_items):
            raise ServiceError(
                409, "item_in_bundle", f"item {item_id!r} is in the served bundle (v{engine.version}) already",
                field="item_id",
            )  # fmt: skip
        known = self.records.get(item_id)
        if known is not None and known.text != text:
            raise _exists(item_id)
        try:
            encoder = await self._encoder_for(engine.bundle)
        except ItemEncoderError as exc:
            raise ServiceError(409, "no_item_encoder", str(exc)) from exc
        if known is None:
            if len(self.records) >= MAX_NEW_ITEMS:
                raise _full()
            embedding = (await asyncio.to_thread(encoder.embed, [text]))[0]
            self._check_room(engine, encoder, embedding)
        else:
            embedding = (await self._embeddings_of(encoder, self._keys(engine), [known]))[0]
        keys = self._keys(engine)
        added_at = datetime.now(UTC).isoformat(timespec="seconds")
        applied, raw = await self._script(
            "add",
            _ADD,
            [keys.items, keys.version, keys.embeddings(encoder.key)],
            [item_id, text, added_at, MAX_NEW_ITEMS, _pack(text, embedding)],
        )
        if int(applied) < 0:
            raise _full()
        record = NewItemRecord.parse(item_id, raw)
        if record.text != text:
            raise _exists(item_id)
        self._embeddings[(encoder.key, item_id)] = (text, embedding)
        await self.sync(force=True)
        status = self.statuses.get(item_id, ItemStatus("not_served", reason="deleted meanwhile"))
        return record, status, int(applied) == 1

    def _check_room(self, engine: Engine, encoder: ItemEncoder, embedding: np.ndarray) -> None:
        """409 ``semantic_id_full`` when the item's prefix has no free collision code left."""
        prefix = encoder.prefixes(embedding[None, :])
        codes = engine.bundle.table.codes  # the bundle's and the served new items'
        try:
            assign_codes(prefix, PrefixIndex(codes, engine.bundle.table.codebook_size), strict=True)
        except CollisionError as exc:
            raise ServiceError(409, "semantic_id_full", str(exc), field="text") from exc

    async def remove(self, item_id: str) -> None:
        """Delete a stored item everywhere (404 ``unknown_new_item`` when it is not one)."""
        engine = self.state.serving()
        keys = self._keys(engine)
        encoder = encoder_key(engine.bundle.manifest)
        deleted = await self._script(
            "delete", _DELETE, [keys.items, keys.version, keys.embeddings(encoder)], [item_id]
        )
        if not int(deleted):
            raise ServiceError(
                404, "unknown_new_item", f"{item_id!r} is not an item added with POST /admin/items"
            )
        await self.sync(force=True)

    async def listing(self) -> list[tuple[NewItemRecord, ItemStatus]]:
        """Every stored item, in the order they were added, with its status in this worker."""
        await self.sync()
        return [
            (r, self.statuses.get(r.item_id, ItemStatus("not_served", reason="not synced yet")))
            for r in sorted(self.records.values(), key=lambda r: r.seq)
        ]


def _exists(item_id: str) -> ServiceError:
    return ServiceError(
        409, "item_exists", f"item {item_id!r} was added with another text; DELETE /admin/items/{{item_id}} first",
        field="item_id",
    )  # fmt: skip


def _full() -> ServiceError:
    return ServiceError(
        409,
        "too_many_new_items",
        f"{MAX_NEW_ITEMS} items are added already; export a bundle that includes them",
    )


# ---- wiring -------------------------------------------------------------------------------------------
def install(app: Any) -> NewItems:
    """Give the app new items: the registry (``app.state.new_items``), its start and stop around the
    app's own lifespan (after the model is loaded, before the first request; stopped before Redis is
    released), and the admin routes when the admin token is set. One call in ``create_app``."""
    from service.api import admin_items
    from service.app import _mount

    state: AppState = app.state.fair
    registry = NewItems(state)
    app.state.new_items = registry
    if state.settings.admin_token is not None:
        _mount(app, state, admin_items.router)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner(a) as value:
            await registry.start()
            try:
                yield value
            finally:
                await registry.stop()

    app.router.lifespan_context = lifespan
    return registry
