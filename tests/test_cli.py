"""The front door: one `crossprobe` command reaches every command, help imports nothing heavy, a
command that cannot load is an error, and a crash never prints local variables."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import click
import pytest
from typer.testing import CliRunner

from crossprobe.cli import COMMANDS, CommandImportError, app, load_command

HEAVY = ("torch", "flwr", "ray", "timm", "scipy", "matplotlib")


def _python(code: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def _crossprobe(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m crossprobe ARGS`` in a fresh process (exit code and streams as a user sees)."""
    cmd = [sys.executable, "-m", "crossprobe", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _modules_after_help(*argv: str) -> set[str]:
    """Top-level modules and crossprobe command modules imported by ``crossprobe ARGV --help``."""
    res = _python(
        """
        import sys
        from typer.testing import CliRunner
        from crossprobe.cli import app
        result = CliRunner().invoke(app, sys.argv[1:] + ["--help"])
        assert result.exit_code == 0, result.output
        print(" ".join(sorted(sys.modules)))
        """,
        *argv,
    )
    assert res.returncode == 0, res.stderr
    return set(res.stdout.split())


def test_help_lists_every_command():
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    for name in COMMANDS:
        assert f"  {name} " in res.output


def test_help_imports_no_command_module():
    loaded = _modules_after_help()
    assert not loaded & {spec.module for spec in COMMANDS.values()}


@pytest.mark.parametrize("argv", [(), *((name,) for name in COMMANDS), ("data", "ingest")])
def test_help_imports_no_heavy_module(argv):
    loaded = _modules_after_help(*argv)
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_in_the_table_loads(name):
    cmd = load_command(name)
    assert isinstance(cmd, click.Command) and cmd.name == name


def test_a_command_whose_module_fails_to_import_is_an_error_naming_it(monkeypatch):
    from crossprobe import cli

    monkeypatch.setitem(cli.COMMANDS, "certs", cli.Command("no_such_module_x", "f", "help"))
    with pytest.raises(CommandImportError, match="'certs'.*no_such_module_x"):
        load_command("certs")
    res = CliRunner().invoke(app, ["certs", "--help"])
    assert res.exit_code != 0 and "no_such_module_x" in res.output
    assert "certs" in CliRunner().invoke(app, ["--help"]).output  # still listed, not hidden


def test_python_dash_m_crossprobe_is_the_same_command():
    res = _crossprobe("--help")
    assert res.returncode == 0 and all(name in res.stdout for name in COMMANDS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_crash_in_any_command_does_not_print_local_variables(tmp_path, name):
    (tmp_path / "superexec.secret").write_text("hunter2-do-not-print")
    (tmp_path / "boom_cmd.py").write_text(
        "def boom() -> None:\n"
        "    superexec_secret = open('superexec.secret').read()\n"
        "    raise RuntimeError('deliberate')\n"
    )
    res = _python(
        """
        import sys
        from crossprobe import cli
        cli.COMMANDS[sys.argv[1]] = cli.Command("boom_cmd", "boom", "raises")
        sys.argv = ["crossprobe", sys.argv[1]]
        cli.main()
        """,
        name,
        cwd=tmp_path,
    )
    assert res.returncode != 0 and "deliberate" in res.stdout + res.stderr
    assert "hunter2" not in res.stdout + res.stderr


def test_preflight_on_a_passphrase_key_names_it_and_prints_no_secret(tmp_path):
    from cryptography.hazmat.primitives import serialization as ser

    from deploy.certs import make_certs

    make_certs(tmp_path, ["lumify"])
    site = tmp_path / "sites" / "lumify"
    secret = (site / "superexec.secret").read_text().strip()
    key = ser.load_pem_private_key((site / "runtime.key").read_bytes(), None)
    enc = ser.BestAvailableEncryption(b"open sesame")
    (site / "runtime.key").write_bytes(
        key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, enc)
    )
    res = _crossprobe("preflight", "--certs", str(site), "--flwr-home", str(tmp_path / "home"))
    out = res.stdout + res.stderr
    assert res.returncode == 12 and "runtime.key: a PEM private key is protected" in out
    assert secret[:8] not in out and "Traceback" not in out


@pytest.mark.parametrize("where", ["a-file", "under-a-file", "proc"])
def test_simulate_into_an_unusable_run_folder_is_one_error(tmp_path, where):
    (tmp_path / "a-file").write_text("x")
    run_dir = {
        "a-file": tmp_path / "a-file",
        "under-a-file": tmp_path / "a-file" / "run",
        "proc": "/proc/crossprobe-run",
    }[where]
    res = _crossprobe("simulate", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "cannot be used as a run folder" in res.stderr and "Traceback" not in res.stderr


def test_bad_input_is_one_line_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: true\n")
    res = _crossprobe("simulate", "--config", str(bad))
    assert res.returncode == 2 and "rounds" in res.stderr and "Traceback" not in res.stderr
