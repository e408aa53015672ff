"""A beam bundle end to end: ``fair-export --search beam`` writes it, the service serves it, and the
service's answer equals the offline ranking in that mode, user for user: ``rank_items`` (the ranking
``fair-eval`` runs, PyTorch's scores through the shared search), ``fair-eval --search beam``'s metrics,
and the offline metrics fair-export recorded in the manifest.

The beam is narrow here (16 candidates of a 120-item catalog), so it is not the exact ranking in
disguise: the test checks that the two differ for some users.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from served_rankings import K, export, served_metrics, served_top_k, split_users, tiny_run_with_data
from service_testlib import TINY_MAX_HISTORY, LiveServer, make_settings

from model.evaluate.cli import main as eval_main
from model.evaluate.ranking import load_run, rank_items
from model.search.modes.registry import make_mode

CANDIDATES = 16
METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")


@pytest.fixture(scope="module")
def beam(tmp_path_factory, tiny_bundle, redis_settings):
    """(the tiny run, the beam bundle, the served top-10 of every test user)."""
    tiny = tiny_run_with_data(tmp_path_factory.mktemp("beam"))
    bundle = export(tiny, "beam", "--search", "beam", "--candidates", str(CANDIDATES), "--evaluate")
    assert (
        bundle.manifest["search"]["mode"] == "beam" and bundle.manifest["search"]["candidates"] == CANDIDATES
    )
    # default_beam_size (10) <= the bundle's candidates: the service ranks with exactly the exported beam
    settings = make_settings(tiny_bundle, redis_settings, bundle=bundle.dir)
    assert settings.default_beam_size <= CANDIDATES
    with LiveServer(settings) as live:
        public = httpx.get(f"{live.url}/model").json()
        assert public["manifest"]["search"]["mode"] == "beam"
        histories, _ = split_users(tiny.dataset)
        return tiny, bundle, served_top_k(live.url, tiny.dataset, histories)


def test_the_service_ranks_as_the_offline_beam_search(beam):
    tiny, _, served = beam
    run = load_run(tiny.run)
    histories, _ = split_users(tiny.dataset)
    offline, _ = rank_items(
        run.model,
        run.table,
        run.trie,
        histories,
        search_mode=make_mode("beam", {"candidates": CANDIDATES}),
        k=K,
        max_history=TINY_MAX_HISTORY,
    )
    assert served.shape == offline.shape == (60, K)
    mismatched = [u for u in range(len(histories)) if not np.array_equal(served[u], offline[u])]
    assert not mismatched, (mismatched, served[mismatched[:3]], offline[mismatched[:3]])
    exact, _ = rank_items(run.model, run.table, run.trie, histories, search_mode="exact", k=K)
    assert (exact != offline).any(axis=1).sum() >= 5  # the narrow beam is its own ranking, not exact's


def test_fair_eval_and_the_manifest_report_what_the_service_delivers(beam, capsys):
    tiny, bundle, served = beam
    _, targets = split_users(tiny.dataset)
    got = served_metrics(served, targets)
    argv = ["--run", str(tiny.run), "--data", str(tiny.data), "--search", "beam", "--beam", str(CANDIDATES)]
    assert eval_main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["users"] == 60 and report["invalid_rate"] == 0.0
    offline = bundle.manifest["metrics"]["bundle"]
    assert offline["search"] == "beam" and offline["candidates"] == CANDIDATES and offline["users"] == 60
    for name in METRICS:
        assert report[name] == pytest.approx(got[name], abs=1e-9), (name, report, got)
        assert offline[name] == pytest.approx(got[name], abs=1e-9), (name, offline, got)
    assert got["recall@10"] > 0  # some targets are found: the equalities compare real rankings
