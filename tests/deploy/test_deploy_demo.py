"""fair-demo's failure behaviour (the happy path, reuse included, runs in test_deploy_prometheus_live.py)."""

from __future__ import annotations

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
