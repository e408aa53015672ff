"""The serving path never imports torch, and the CLIs answer --help and bad input cleanly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service import cli


def test_service_never_imports_torch():
    code = (
        "import sys\n"
        "from service.app import create_app\n"
        "import service.cli, service.load_histories, service.engine, service.batcher\n"
        "from service.settings import Settings\n"
        "create_app(Settings(bundle=None))\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not leaked, leaked\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_fair_serve_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--bundle",
        "--host",
        "--port",
        "--workers",
        "--redis-url",
        "--max-batch-size",
        "--max-wait-ms",
    ):
        assert flag in out
    assert "--admin-token" not in out  # environment only


def test_fair_serve_rejects_bad_settings(capsys, tmp_path):
    assert cli.main(["--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert cli.main(["--bundle", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
