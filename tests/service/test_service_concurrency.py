"""Concurrency: many requests at once are micro-batched; a reload under load fails no request."""

from __future__ import annotations

import asyncio
import time

import httpx
from service_testlib import ADMIN_TOKEN, sample, scrape


async def _burst(url: str, bodies: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        return await asyncio.gather(*(client.post("/recommend", json=b) for b in bodies))


def test_200_concurrent_requests_succeed_in_batches(server, tiny_bundle):
    ids = tiny_bundle.dataset.item_ids
    users = tiny_bundle.dataset.user_ids
    # half through stored histories, half with the history in the body
    for u in users:
        httpx.post(f"{server.url}/users/{u}/events", json={"item_ids": ids[:3]})
    bodies = [
        {"user_id": users[i % len(users)]}
        if i % 2
        else {"user_id": f"anon-{i}", "history": ids[i % 50 : i % 50 + 4]}
        for i in range(200)
    ]
    before = scrape(server.url)
    responses = asyncio.run(_burst(server.url, bodies))
    assert [r.status_code for r in responses] == [200] * 200
    assert all(len(r.json()["items"]) == 10 for r in responses)
    after = scrape(server.url)
    batches = sample(after, "fair_batch_size_count") - sample(before, "fair_batch_size_count")
    singles = sample(after, "fair_batch_size_bucket", le="1.0") - sample(
        before, "fair_batch_size_bucket", le="1.0"
    )
    requests = sample(after, "fair_batch_size_sum") - sample(before, "fair_batch_size_sum")
    assert requests == 200
    assert batches - singles > 0, "no batch larger than 1"
    assert batches < 200


def test_reload_under_load_fails_nothing(server, tiny_bundle):
    ids = tiny_bundle.dataset.item_ids
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def scenario():
        stop = asyncio.Event()
        statuses, versions = [], []

        async def load(client: httpx.AsyncClient, n: int):
            while not stop.is_set():
                r = await client.post("/recommend", json={"user_id": f"l{n}", "history": ids[n : n + 5]})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.append(r.json()["model_version"])

        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            tasks = [asyncio.create_task(load(client, n)) for n in range(16)]
            await asyncio.sleep(0.3)
            reload = await client.post("/admin/reload", json={}, headers=auth)
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*tasks)
        return reload, statuses, versions

    reload, statuses, versions = asyncio.run(scenario())
    assert reload.status_code == 200, reload.text
    assert reload.json() == {
        "name": "tiny", "version": 2, "previous_version": 1, "provider": "CPUExecutionProvider", "changed": True,
        "pinned_version": None,
    }  # fmt: skip
    assert statuses and set(statuses) == {200}
    assert versions[0] == 1 and versions[-1] == 2  # requests admitted before the swap finish on v1
    assert httpx.get(server.url + "/model").json()["version"] == 2
    m = scrape(server.url)
    assert sample(m, "fair_model_info", name="tiny", version=2, provider="CPUExecutionProvider") == 1
    assert sample(m, "fair_model_info", name="tiny", version=1, provider="CPUExecutionProvider") == 0
    # the replaced engine is collected once its last requests are answered, and its memory trimmed
    tasks = list(server.state.trim_tasks)  # a done task leaves the set: it may already be gone
    deadline = time.monotonic() + 60
    while server.state.trim_tasks and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not server.state.trim_tasks
    assert all(t.result() is True for t in tasks)

    # a second reload to the same version is a no-op; back to 1 works too
    same = httpx.post(server.url + "/admin/reload", headers=auth).json()
    assert same["changed"] is False and same["version"] == 2
    back = httpx.post(server.url + "/admin/reload", json={"version": 1}, headers=auth).json()
    assert back["version"] == 1 and back["previous_version"] == 2


def test_a_reload_with_no_request_after_it_still_frees_and_trims_the_old_engine(server, tiny_bundle):
    """The inference worker must not keep its last batch (and so the engine it ran on) while it waits for
    the next request: after a reload on an idle service, the replaced engine is collected and trimmed."""
    ids = tiny_bundle.dataset.item_ids
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def reload_then_wait(body: dict) -> None:
        for n in range(3):  # answered by the engine about to be replaced
            r = httpx.post(f"{server.url}/recommend", json={"user_id": f"i{n}", "history": ids[n : n + 3]})
            assert r.status_code == 200
        freed = sample(scrape(server.url), "fair_replaced_engines_total", outcome="freed")
        r = httpx.post(f"{server.url}/admin/reload", json=body, headers=auth, timeout=60)
        assert r.status_code == 200 and r.json()["changed"], r.text
        deadline = time.monotonic() + 60  # the trim waits up to 120 s for a still-referenced engine
        while time.monotonic() < deadline:
            if sample(scrape(server.url), "fair_replaced_engines_total", outcome="freed") == freed + 1:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the replaced engine is still referenced 60 s after an idle reload")

    start = httpx.get(server.url + "/model").json()["version"]
    reload_then_wait({"version": 2 if start == 1 else 1})  # the other version, no request after it
    reload_then_wait({} if start == 2 else {"version": start})  # back (to following the newest if it was)
