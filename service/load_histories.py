"""``fair-load-histories``: bulk-load a dataset's user histories into the service's Redis.

Any dataset ``model.data.loading.load_dataset`` reads works (benchmark folder, raw Amazon dump,
interactions table, ``synthetic:...`` spec). Each user's list is REPLACED, not appended to: ``DEL`` +
``RPUSH`` (+ ``LTRIM`` to the maximum) in one MULTI/EXEC per chunk of users, so readers never see a
half-written list and a second run leaves Redis exactly as the first did (idempotent). On a Redis
Cluster the chunk's users live in different slots, so each user's three commands are pipelined
without a cross-slot transaction (still idempotent; a reader may briefly see that one list empty).
"""

from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

from service.embedded_redis import EmbeddedRedis
from service.redact import flag_refusal, has_secret, redact_url
from service.redis_store import DEFAULT_PREFIX, REDIS_FAILURES, sync_client


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fair-load-histories",
        description="Load every user's history of a dataset into Redis (one list per user, newest last). "
        "Idempotent: each user's list is replaced, so running it twice changes nothing.",
    )
    p.add_argument("--data", required=True, help="dataset folder or synthetic:... spec (as for fair-data)")
    p.add_argument(
        "--redis",
        default=None,
        help="redis://, rediss:// or unix:// URL WITHOUT a password (command lines are public: a URL with "
        "credentials goes in the environment variable FAIR_REDIS_URL); neither: the embedded Redis under "
        "--data-dir",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        default=os.environ.get("FAIR_REDIS_CLUSTER", "").lower() in ("1", "true", "yes"),
        help="the URL names a Redis Cluster node [env FAIR_REDIS_CLUSTER]",
    )
    p.add_argument(
        "--data-dir",
        default=os.environ.get("FAIR_DATA_DIR", "data/service"),
        help="embedded Redis data directory (as the service's FAIR_DATA_DIR) when no URL is given",
    )
    p.add_argument(
        "--max-items",
        type=int,
        default=int(os.environ.get("FAIR_HISTORY_MAX_ITEMS", 200)),
        help="keep each user's newest N items (the service's FAIR_HISTORY_MAX_ITEMS)",
    )
    p.add_argument("--prefix", default=os.environ.get("FAIR_HISTORY_KEY_PREFIX", DEFAULT_PREFIX))
    p.add_argument("--chunk", type=int, default=1000, help="users per pipelined round trip")
    return p


def load_histories(client, dataset, prefix: str, max_items: int, chunk: int, cluster: bool) -> int:
    """Write every user's (newest ``max_items``) history; returns the number of users written."""
    ids = dataset.item_ids
    n = dataset.num_users
    with tqdm(total=n, desc="users", unit="user", disable=None) as bar:
        for start in range(0, n, chunk):
            pipe = client.pipeline(transaction=not cluster)
            for u in range(start, min(start + chunk, n)):
                key = f"{prefix}{dataset.user_ids[u]}"
                items = [ids[i] for i in dataset.sequences[u][-max_items:]]
                pipe.delete(key)
                if items:
                    pipe.rpush(key, *items)
            pipe.execute()
            bar.update(min(chunk, n - start))
    return n


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if has_secret(args.redis):
        print(flag_refusal("fair-load-histories", "--redis"), file=sys.stderr)
        return 2
    url = args.redis or os.environ.get("FAIR_REDIS_URL") or None
    if args.max_items < 1 or args.chunk < 1:
        print("fair-load-histories: --max-items and --chunk must be >= 1", file=sys.stderr)
        return 2
    from model.data.loading import load_dataset

    try:
        dataset = load_dataset(args.data)
    except (OSError, ValueError) as exc:
        print(f"fair-load-histories: --data {args.data}: {exc}", file=sys.stderr)
        return 1
    embedded = None
    try:
        if not url:
            embedded = EmbeddedRedis(args.data_dir).start()
            url = embedded.url
        client = sync_client(url, cluster=args.cluster)
        users = load_histories(client, dataset, args.prefix, args.max_items, args.chunk, args.cluster)
    except (*REDIS_FAILURES, RuntimeError) as exc:  # type: ignore[misc]  # mypy: a starred tuple of classes
        where = redact_url(url) if url else "(embedded)"
        print(f"fair-load-histories: redis {where}: {exc}", file=sys.stderr)
        return 1
    finally:
        if embedded is not None:
            embedded.stop()
    where = redact_url(url) if embedded is None else f"embedded Redis in {args.data_dir}"
    print(f"loaded {users} user histories from {args.data} into {where} (prefix {args.prefix!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
