"""fair-load-histories: every user's list written newest last, trimmed, and a rerun changes nothing."""

from __future__ import annotations

import os
import tempfile

from service.embedded_redis import EmbeddedRedis
from service.load_histories import main
from service.redis_store import sync_client

SPEC = "synthetic:items=80,users=30,seed=3"


def _snapshot(client, prefix: str) -> dict[str, list[str]]:
    return {key: client.lrange(key, 0, -1) for key in client.scan_iter(match=f"{prefix}*")}


def test_load_is_complete_trimmed_and_idempotent(redis_settings):
    from model.data.loading import load_dataset

    dataset = load_dataset(SPEC)
    url = redis_settings.get("redis_url")
    prefix = redis_settings.get("history_key_prefix", "fair:history:") + "lh:"
    with tempfile.TemporaryDirectory(prefix="fair-lh-") as data_dir:
        server = None if url else EmbeddedRedis(data_dir).start()
        try:
            url = url or server.url
            cluster = redis_settings.get("redis_cluster", False)
            client = sync_client(url, cluster=cluster)
            args = ["--data", SPEC, "--redis", url, "--prefix", prefix, "--max-items", "6", "--chunk", "7"]
            args += ["--cluster"] if cluster else []
            assert main(args) == 0
            first = _snapshot(client, prefix)
            assert len(first) == dataset.num_users
            for user, seq in zip(dataset.user_ids, dataset.sequences, strict=True):
                assert first[prefix + user] == [dataset.item_ids[i] for i in seq[-6:]]
            client.rpush(prefix + dataset.user_ids[0], "live-event")  # drift, undone by a rerun
            assert main(args) == 0
            assert _snapshot(client, prefix) == first
            client.delete(*first)
        finally:
            if server is not None:
                server.stop()


def test_bad_data_is_a_one_line_error(capsys):
    assert (
        main(["--data", os.path.join(tempfile.gettempdir(), "no-such-dataset-dir"), "--redis", "redis://x"])
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("fair-load-histories: --data") and "\n" not in err
