"""POST/GET/DELETE /admin/items: items added without retraining (issue 21.4), through the public API on
a real Redis and real ONNX Runtime.

The bundle is a tiny FAIR run exported with ``--item-encoder`` (tests/export/tiny_item_encoder.py: a
random 2-layer BERT built offline, rq-kmeans semantic IDs from its embeddings). An added item must be
scored exactly as a cold catalog item of that semantic ID: the test computes the expected ranking with
PyTorch (FAIR's own item score, sentence-transformers' embedding, rq-kmeans' nearest centroid), not
with the service's code.
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch
from service_testlib import ADMIN_TOKEN, LiveServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from tiny_item_encoder import ITEMS, MAX_HISTORY, VOCAB, build_item_encoder_run, item_text  # noqa: E402

from export.bundle import ITEM_ENCODER_FILES, ITEM_ENCODER_KEY, load_bundle, write_bundle  # noqa: E402
from export.cli import main as export_main  # noqa: E402
from export.onnx_export import next_item_history  # noqa: E402
from model.search.modes.ann import AnnMode  # noqa: E402
from model.search.modes.beam import BeamMode  # noqa: E402
from model.search.modes.exact import ExactMode  # noqa: E402
from model.semantic_ids.rqkmeans import nearest  # noqa: E402
from model.semantic_ids.table import SemanticIdTable  # noqa: E402
from service import new_items  # noqa: E402
from service.engine import load_engine  # noqa: E402
from service.new_item_encoder import ItemEncoder, PrefixIndex, assign_codes  # noqa: E402
from service.new_items import SYNC_INTERVAL_S, Catalog, Keys  # noqa: E402
from service.settings import Settings  # noqa: E402

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
RENAMED = "brand-new-item"  # the id a later bundle version gives catalog row RENAMED_ROW
RENAMED_ROW = 7


class Bundles:
    def __init__(self, tmp: Path):
        self.src = build_item_encoder_run(tmp / "src")
        self.name = f"ni{uuid.uuid4().hex[:8]}"  # own Redis keys, also on a shared test Redis
        root = tmp / "bundles"
        argv = ["--run", str(self.src.run), "--data", str(self.src.data), "--out", str(root)]
        assert (
            export_main([*argv, "--name", self.name, "--item-encoder", "--users", "16", "--search", "exact"])
            == 0
        )
        self.dir = root / self.name
        v1 = load_bundle(self.dir / "1")
        self.v1 = v1
        manifest = {k: v for k, v in v1.manifest.items() if k not in ("schema_version", "version", "files")}
        files = {name: v1.dir / name for name in v1.manifest["files"]}
        # a bundle of the same model exported without --item-encoder
        self.plain_name = f"{self.name}p"
        plain = {k: v for k, v in manifest.items() if k != ITEM_ENCODER_KEY} | {"name": self.plain_name}
        write_bundle(
            root / self.plain_name, plain, {n: p for n, p in files.items() if n not in ITEM_ENCODER_FILES}
        )
        self.plain = root / self.plain_name
        # version 2 of a third model dir: the same bundle whose catalog row 7 is now called RENAMED (a new
        # bundle that includes an item added before); version 1 there is the original
        self.later_name = f"{self.name}l"
        later = root / self.later_name
        write_bundle(later, manifest | {"name": self.later_name}, files, version=1)
        ids = list(v1.table.item_ids)
        ids[RENAMED_ROW] = RENAMED
        table = SemanticIdTable(
            ids, v1.table.codes, v1.table.codebook_size, v1.table.meta, v1.table.quantizer
        )
        table.save(tmp / "renamed.npz")
        renamed = manifest | {
            "name": self.later_name,
            "sid_sha256": table.sha256(),
            "catalog_sha256": table.catalog_hash,
        }
        write_bundle(later, renamed, files | {"semantic_ids.npz": tmp / "renamed.npz"}, version=2)
        self.later = later


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Bundles:
    return Bundles(tmp_path_factory.mktemp("new-items"))


def _settings(bundle: Path, redis_settings: dict, **overrides) -> Settings:
    values = dict(
        bundle=bundle,
        admin_token=ADMIN_TOKEN,
        max_batch_size=8,
        max_wait_ms=2.0,
        intra_op_threads=1,
        inter_op_threads=1,
        providers=["CPUExecutionProvider"],
        request_timeout_ms=30_000,
        redis_timeout_ms=5_000,
    )
    return Settings(**(values | redis_settings | overrides))


def _server(bundle: Path, redis_settings: dict, **overrides) -> LiveServer:
    """A live server: create_app installs new items (the registry, its sync and the admin routes)."""
    live = LiveServer(_settings(bundle, redis_settings, **overrides))
    assert isinstance(live.app.state.new_items, new_items.NewItems)
    return live


@pytest.fixture(scope="module")
def server(bundles, redis_settings):
    with _server(bundles.dir, redis_settings) as live:
        yield live


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c
        for item in c.get("/admin/items").json()["items"]:  # every test starts without new items
            assert c.delete(f"/admin/items/{item['item_id']}").status_code == 200


def _redis(live: LiveServer) -> redis.Redis:
    s = live.settings
    url = s.redis_url or live.state.embedded.url
    return redis.Redis.from_url(url, decode_responses=True)


def _known(url: str, item_id: str) -> bool:
    """Whether the server at ``url`` knows ``item_id`` (a history of it alone is not the fallback);
    /recommend does not sync, so this shows what the worker picked up by itself."""
    r = httpx.post(url + "/recommend", json={"user_id": "probe", "history": [item_id], "k": 1}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["fallback"] is None


def _wait(condition, timeout_s: float = 20.0) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - start


# ---- what the item gets --------------------------------------------------------------------------------
def _expected_codes(bundles: Bundles, text: str, taken: np.ndarray) -> list[int]:
    """The semantic ID computed with sentence-transformers and rq-kmeans' own nearest centroid."""
    from sentence_transformers import SentenceTransformer

    e = SentenceTransformer(str(bundles.src.sentence), device="cpu").encode([text])
    residual, codes = e.astype(np.float32), []
    for book in bundles.v1.table.quantizer["codebooks"]:
        c = int(nearest(residual, book)[0])
        codes.append(c)
        residual = residual - book[c]
    same = taken[np.all(taken[:, :-1] == codes, axis=1), -1]
    return [*codes, int(min(set(range(VOCAB)) - set(same.tolist())))]


def _reference_top(
    bundles: Bundles, history: list[str], new_codes: list[int], k: int
) -> tuple[list[str], np.ndarray]:
    """PyTorch's ranking of the catalog + the new item (a cold item: its code part) for ``history``."""
    model, table = bundles.src.model, bundles.v1.table
    index = table.index_of()
    codes = [table.codes[index[i]] if i in index else new_codes for i in history]
    items = [index.get(i, -1) for i in history]
    with torch.no_grad():
        h = next_item_history(
            model,
            torch.as_tensor(np.asarray([codes], dtype=np.int64)),
            torch.tensor([items], dtype=torch.int64),
            torch.ones(1, len(history), dtype=torch.bool),
        )
        base = model.item_logits(h, torch.as_tensor(table.codes))[0].double().numpy()
        code_scores = model.head_logits(h)[0].double().numpy()  # [L, V]
    new = sum(code_scores[level, c] for level, c in enumerate(new_codes))
    scores = np.append(base, new)
    order = np.argsort(-scores, kind="stable")[:k]
    ids = [*table.item_ids, "NEW"]
    return [ids[i] for i in order], scores[order]


def test_an_added_item_is_served_as_a_cold_item_of_its_semantic_id(bundles, server, client):
    text = "title: red matte lipstick velvet; brand: luxe"
    expected = _expected_codes(bundles, text, bundles.v1.table.codes)
    r = client.post("/admin/items", json={"item_id": "fresh-1", "text": text})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "served" and body["created"] and body["semantic_id"] == expected
    assert body["model_version"] == 1 and body["seq"] >= 1
    # ranked with everything else: the whole served top-k equals PyTorch's, new item included, both for
    # a history of catalog items and for one that holds the new item (its input: codes, no ID row)
    histories = [bundles.src.dataset.item_ids[: MAX_HISTORY - 1][i:] for i in range(3)]
    histories.append(["item3", "fresh-1"])
    found = False
    for history in histories:
        ids, scores = _reference_top(bundles, history, expected, k=100)
        ids = ["fresh-1" if i == "NEW" else i for i in ids]
        req = {"user_id": "u", "history": history, "k": 100, "exclude_seen": False}
        served = client.post("/recommend", json=req).json()["items"]
        assert [i["item_id"] for i in served] == ids
        np.testing.assert_allclose([i["score"] for i in served], scores, atol=2e-4)
        found |= "fresh-1" in ids
        new = [i for i in served if i["item_id"] == "fresh-1"]
        assert not new or new[0]["semantic_id"] == expected
    assert found, "the new item never ranked in a top 100 of 151: pick other histories"
    listing = client.get("/admin/items").json()
    assert [(i["item_id"], i["status"], i["semantic_id"]) for i in listing["items"]] == [
        ("fresh-1", "served", expected)
    ]
    # seen items are excluded as any other item
    req = {"user_id": "u", "history": ["fresh-1"], "k": 100}
    assert "fresh-1" not in [i["item_id"] for i in client.post("/recommend", json=req).json()["items"]]


def test_refusals_leave_nothing_behind(bundles, server, client):
    text = "title: green mint soap; brand: pure"
    assert client.post("/admin/items", json={"item_id": "fresh-2", "text": text}).status_code == 201
    store = _redis(server)
    keys = Keys.of(bundles.name)
    before = (store.get(keys.version), store.hgetall(keys.items))
    same = client.post("/admin/items", json={"item_id": "fresh-2", "text": text})
    assert same.status_code == 200 and same.json()["created"] is False
    cases = [
        ({"item_id": "fresh-2", "text": "another text"}, 409, "item_exists", "item_id"),
        ({"item_id": "item3", "text": text}, 409, "item_in_bundle", "item_id"),
        ({"item_id": "fresh-3", "text": ""}, 422, "invalid_request", "text"),
        (
            {"item_id": "fresh-3", "text": "x" * (new_items.MAX_TEXT_CHARS + 1)},
            422,
            "invalid_request",
            "text",
        ),
        ({"item_id": "", "text": text}, 422, "invalid_request", "item_id"),
        ({"item_id": "fresh-3", "text": text, "extra": 1}, 422, "invalid_request", "extra"),
    ]
    for body, status, code, field in cases:
        r = client.post("/admin/items", json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["code"] == code and r.json()["error"].get("field") == field
    assert httpx.post(server.url + "/admin/items", json={"item_id": "x", "text": text}).status_code == 401
    r = client.delete("/admin/items/item3")  # a bundle item is not a new item
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_new_item"
    assert (store.get(keys.version), store.hgetall(keys.items)) == before


def test_a_full_semantic_id_prefix_is_refused(bundles, server, client):
    """Items of one text share a prefix: the collision code numbers them until the codebook is full."""
    text = "title: pink rose balm; brand: bloom"
    prefix = _expected_codes(bundles, text, bundles.v1.table.codes)[:-1]
    in_catalog = int(np.all(bundles.v1.table.codes[:, :-1] == prefix, axis=1).sum())
    codes = []
    for i in range(VOCAB - in_catalog):
        r = client.post("/admin/items", json={"item_id": f"twin-{i}", "text": text})
        assert r.status_code == 201, r.text
        codes.append(r.json()["semantic_id"][-1])
    assert len(set(codes)) == len(codes)  # each its own collision code
    count = len(client.get("/admin/items").json()["items"])
    r = client.post("/admin/items", json={"item_id": "twin-last", "text": text})
    assert r.status_code == 409 and r.json()["error"]["code"] == "semantic_id_full"
    assert len(client.get("/admin/items").json()["items"]) == count


def test_a_second_worker_serves_and_drops_an_item_within_a_second(bundles, server, client, redis_settings):
    """Two app instances on one Redis: what one adds or deletes, the other picks up on its own (its
    0.5 s poll of the change counter), measured from the first one's answer."""
    assert SYNC_INTERVAL_S <= 0.5
    with _server(bundles.dir, redis_settings) as other:
        assert not _known(other.url, "fresh-4")
        r = client.post(
            "/admin/items", json={"item_id": "fresh-4", "text": "title: blue ocean mist; brand: nova"}
        )
        assert r.status_code == 201 and _known(server.url, "fresh-4")  # the answering worker: at once
        took = _wait(lambda: _known(other.url, "fresh-4"))
        print(f"second worker served the new item {took * 1000:.0f} ms after the answer")
        assert took < 2.0  # 0.5 s poll + a rebuild; 2 s leaves room for a loaded test machine
        assert client.delete("/admin/items/fresh-4").status_code == 200
        assert not _known(server.url, "fresh-4")
        took = _wait(lambda: not _known(other.url, "fresh-4"))
        assert took < 2.0
        # the second worker read the embedding the first stored: it never ran the text encoder
        registry = other.app.state.new_items
        assert registry._encoder is None or registry._encoder._session is None


def test_items_are_restored_at_restart(bundles, server, client, redis_settings):
    text = "title: gold shimmer powder; brand: glow"
    assert client.post("/admin/items", json={"item_id": "fresh-5", "text": text}).status_code == 201
    with _server(bundles.dir, redis_settings) as restarted:
        assert _known(restarted.url, "fresh-5")  # before any admin call: restored at startup
        with httpx.Client(base_url=restarted.url, headers=AUTH, timeout=60) as c:
            items = c.get("/admin/items").json()["items"]
        assert [(i["item_id"], i["status"]) for i in items] == [("fresh-5", "served")]


def test_a_bundle_that_has_the_item_wins(bundles, redis_settings):
    with (
        _server(bundles.later / "1", redis_settings) as live,
        httpx.Client(base_url=live.url, headers=AUTH, timeout=60) as c,
    ):
        r = c.post("/admin/items", json={"item_id": RENAMED, "text": "title: white lily lotion; brand: silk"})
        assert r.status_code == 201 and r.json()["status"] == "served"
        added_code = r.json()["semantic_id"]
        assert c.post("/admin/reload", json={"version": 2}).status_code == 200
        item = _wait_status(c, RENAMED, "in_bundle")
        assert item["semantic_id"] is None
        assert _known(live.url, RENAMED)
        engine = live.state.engine
        assert engine.item_index[RENAMED] == RENAMED_ROW  # the bundle's row; nothing appended
        assert engine.bundle.table.num_items == ITEMS
        # back to a bundle without it: the stored item is served again
        assert c.post("/admin/reload", json={"version": 1}).status_code == 200
        assert _wait_status(c, RENAMED, "served")["semantic_id"] == added_code
        assert c.delete(f"/admin/items/{RENAMED}").status_code == 200


def _wait_status(c: httpx.Client, item_id: str, status: str) -> dict:
    found: dict = {}

    def done() -> bool:
        items = {i["item_id"]: i for i in c.get("/admin/items").json()["items"]}
        found.update(items.get(item_id, {}))
        return found.get("status") == status

    _wait(done)
    return found


def test_a_bundle_without_item_encoder_answers_409(bundles, redis_settings):
    with (
        _server(bundles.plain, redis_settings) as live,
        httpx.Client(base_url=live.url, headers=AUTH, timeout=60) as c,
    ):
        r = c.post("/admin/items", json={"item_id": "fresh-6", "text": "title: soft comb; brand: acme"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_item_encoder"
        assert "--item-encoder" in r.json()["error"]["message"]
        assert c.get("/admin/items").json()["items"] == []
        assert not _redis(live).exists(Keys.of(bundles.plain_name).items)


def test_openapi_documents_the_routes_and_their_errors(server):
    paths = httpx.get(server.url + "/openapi.json", timeout=30).json()["paths"]
    post = paths["/admin/items"]["post"]["responses"]
    assert set(post) == {"200", "201", "401", "408", "409", "413", "422", "500", "503"}
    assert "semantic_id_full" in post["409"]["description"]
    assert set(paths["/admin/items"]["get"]["responses"]) == {"200", "401", "500", "503"}
    delete = paths["/admin/items/{item_id}"]["delete"]["responses"]
    assert set(delete) == {"200", "401", "404", "422", "500", "503"}


@pytest.mark.parametrize(
    "mode", [ExactMode(), BeamMode(candidates=200), AnnMode(candidates=200, nprobe=1000)]
)
def test_every_search_mode_ranks_new_items_exactly(bundles, mode):
    """The bundle's mode over its own items, the new items scored exactly and merged: with a beam / an
    index wide enough to be exact, the answer is exact search over the whole extended catalog."""
    engine = load_engine(bundles.dir / "1", providers=["CPUExecutionProvider"])
    engine.bundle = replace(engine.bundle, search=mode)
    encoder = ItemEncoder.load(engine.bundle)
    rng = np.random.default_rng(3)
    texts = [item_text(rng) for _ in range(12)]
    emb = encoder.embed(texts)
    codes, ok = assign_codes(encoder.prefixes(emb), PrefixIndex(engine.bundle.table.codes, VOCAB))
    assert ok.all()
    extended = Catalog(engine).extend([f"n{i}" for i in range(12)], encoder.rows(codes, emb))
    histories = [np.array([1, 2, ITEMS + 3]), np.array([ITEMS, ITEMS + 11, 5, 9]), np.array([40])]
    scores = extended.forward(histories)
    exclude = [np.unique(h) for h in histories]
    items, got = extended.search(scores, 10, 20, exclude)
    reference = ExactMode().search(extended.bundle.scorer, extended.bundle.trie, scores.outputs, 20, exclude)
    assert np.array_equal(items, reference.items)
    np.testing.assert_allclose(got, reference.scores, rtol=1e-6, atol=1e-6)
    assert (items >= ITEMS).any()


def test_catalog_appends_without_copying_and_never_changes_rows_in_use(bundles):
    """An add writes rows past every view handed out (no copy of the catalog); a delete writes fresh
    buffers; an engine already serving keeps its rows either way; the loaded bundle's own arrays are
    released once its engine is gone."""
    import gc
    import weakref

    engine = load_engine(bundles.dir / "1", providers=["CPUExecutionProvider"])
    original = weakref.ref(engine.bundle.scorer.table)
    encoder = ItemEncoder.load(engine.bundle)
    rng = np.random.default_rng(5)
    emb = encoder.embed([item_text(rng) for _ in range(3)])
    codes, _ = assign_codes(encoder.prefixes(emb), PrefixIndex(engine.bundle.table.codes, VOCAB))
    rows = encoder.rows(codes, emb)
    catalog = Catalog(engine)
    del engine
    gc.collect()
    assert original() is None  # only the catalog's buffers hold the bundle's rows now
    two = catalog.extend(
        ["a", "b"],
        replace(rows, codes=rows.codes[:2], table=rows.table[:2], bias=rows.bias[:2], inputs=rows.inputs[:2]),
    )
    buffer, before = catalog.table, two.bundle.scorer.table.copy()
    three = catalog.extend(["a", "b", "c"], rows)
    assert catalog.table is buffer  # appended in place
    assert three.bundle.table.num_items == ITEMS + 3 and three.item_index["c"] == ITEMS + 2
    assert np.array_equal(two.bundle.scorer.table, before)
    rows_bc = replace(
        rows, codes=rows.codes[1:], table=rows.table[1:], bias=rows.bias[1:], inputs=rows.inputs[1:]
    )
    after_delete = catalog.extend(["b", "c"], rows_bc)  # "a" deleted: rows move, so fresh buffers
    assert catalog.table is not buffer
    assert np.array_equal(two.bundle.scorer.table, before)
    assert after_delete.item_index["b"] == ITEMS and "a" not in after_delete.item_index
    np.testing.assert_array_equal(after_delete.bundle.scorer.table[ITEMS:], rows.table[1:])
