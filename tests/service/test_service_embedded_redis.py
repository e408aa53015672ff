"""The embedded Redis: one server per data directory, found again by every process that uses it."""

from __future__ import annotations

from service.embedded_redis import EmbeddedRedis


def test_long_data_dir_still_shares_one_server(tmp_path):
    """AF_UNIX paths are short, so a deep data dir puts the socket elsewhere: at a place every process
    derives the same way, or fair-load-histories would start a second server on the same files."""
    data_dir = tmp_path / ("d" * 60) / ("e" * 60)
    first = EmbeddedRedis(data_dir).start()
    try:
        second = EmbeddedRedis(data_dir)
        assert second.socket_path == first.socket_path and len(str(first.socket_path)) <= 100
        second.start()
        assert second.proc is None  # reused the running server instead of starting another
        second._probe().set("k", "v")
        assert first._probe().get("k") == b"v"
    finally:
        first.stop()
    assert not EmbeddedRedis(data_dir).answers()
    assert not first.socket_path.parent.exists()  # nothing left in the temporary directory
