"""fair-demo's failure behaviour (the happy path, reuse included, runs in test_deploy_prometheus_live.py),
and its Redis URL: env-only when it has a password, never printed with it."""

from __future__ import annotations

import os

import pytest

from service import demo
from service.demo import main


def test_bad_arguments_exit_2(tmp_path, capfd):
    assert main(["build", "--dir", str(tmp_path), "--items", "0"]) == 2
    assert "--items" in capfd.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_failing_step_names_itself_and_leaves_nothing_half_built(tmp_path, capfd):
    rc = main(["build", "--dir", str(tmp_path / "demo"), "--items", "40", "--users", "50", "--noise", "1.5"])
    assert rc == 1
    err = capfd.readouterr().err
    assert "fair-demo: step failed (exit 2): fair-data synth" in err
    assert "noise" in err  # fair-data's own message about the bad value comes through
    demo = tmp_path / "demo"
    assert not (demo / ".done-data").exists() and not (demo / "data").exists()
    assert not (demo / "bundles").exists()


def test_run_refuses_a_busy_port_before_building(tmp_path, capfd):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["run", "--dir", str(tmp_path / "demo"), "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capfd.readouterr().err
    assert not (tmp_path / "demo").exists()


# ---- the Redis URL's password (issue 24.5) ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["load", "run"])
def test_the_redis_flag_refuses_a_url_with_a_password(command, tmp_path, capfd):
    url = "redis://:hunter2hunter2@redis:6379/0"
    assert main([command, "--dir", str(tmp_path / "demo"), "--redis", url]) == 2
    captured = capfd.readouterr()
    assert "hunter2" not in captured.out + captured.err
    assert "FAIR_REDIS_URL" in captured.err
    assert not (tmp_path / "demo").exists()  # refused before building anything


def test_load_hands_the_url_to_fair_load_histories_in_its_environment(tmp_path, monkeypatch, capfd):
    """Never on the child's command line (ps), and the step's echoed command shows no password."""
    secret_url = "redis://app:hunter2hunter2@redis:6379/0"
    monkeypatch.setenv("FAIR_REDIS_URL", secret_url)
    calls = []
    monkeypatch.setattr(demo.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    opts = demo.build_parser().parse_args(["load", "--dir", str(tmp_path)])
    opts.redis = opts.redis or os.environ["FAIR_REDIS_URL"]  # what main() does
    demo.load(demo.DemoPaths(tmp_path, tmp_path / "bundles"), opts)
    ((cmd, env),) = calls
    assert not any("hunter2" in arg for arg in cmd)
    assert env["FAIR_REDIS_URL"] == secret_url
    assert "hunter2" not in capfd.readouterr().out


def test_echoed_commands_hide_url_passwords(monkeypatch, capfd):
    monkeypatch.setattr(demo.subprocess, "call", lambda cmd, env: 0)
    demo.run_step("fair-load-histories", ["--data", "d", "--redis", "redis://:hunter2hunter2@r/0"], {})
    out = capfd.readouterr().out
    assert "hunter2" not in out and "redis://:***@r/0" in out
