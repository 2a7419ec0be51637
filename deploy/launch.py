"""``crossprobe launch``: register the SuperNode keys, start a run with ``flwr run``, wait for it,
and exit with its real status from ``flwr ls --format json`` (``flwr run`` exits 0 even when the
run failed)."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Annotated

import typer

from common.signals import Stopped, stop_signals_raise
from deploy.argv import CONNECTION, FLOWER_ENV, connection_toml
from deploy.preflight import check_tls, split_address

APP_DIR = Path(__file__).resolve().parents[1]


class LaunchError(RuntimeError):
    """Registering keys or starting the run failed; the message says what Flower answered."""


def flwr_json(
    args: list[str], env: dict[str, str], cwd: Path = APP_DIR, timeout: float = 120
) -> dict:
    """Run ``flwr ... --format json`` and parse its answer."""
    flwr = shutil.which("flwr", path=env.get("PATH")) or "flwr"
    res = subprocess.run([flwr, *args, "--format", "json"], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=timeout)  # fmt: skip
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError:
        raise LaunchError(
            f"flwr {' '.join(args[:2])}: no JSON (exit {res.returncode}): "
            f"{res.stdout[-400:]} {res.stderr[-400:]}"
        ) from None


def register_keys(keys: dict[str, Path], env: dict[str, str]) -> dict[str, str]:
    """Register each SuperNode public key (name -> file); an already registered key is fine."""
    out = {}
    for name, path in keys.items():
        ans = flwr_json(["supernode", "register", str(path), CONNECTION, "--name", name], env)
        if ans.get("success"):
            out[name] = str(ans.get("node-id"))
        elif "already in use" in str(ans.get("error-message", "")):
            out[name] = "already registered"
        else:  # `flwr supernode register --format json` exits 0 even when it failed
            raise LaunchError(f"registering {path} as {name!r}: {ans.get('error-message', ans)}")
    return out


def wait_tls(address: str, ca: Path, timeout: float) -> None:
    """Wait until ``address`` accepts a TLS handshake verified with ``ca``."""
    host, port = split_address(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            check_tls(host, port, ca, 5.0)
            return
        except (OSError, ssl.SSLError) as err:
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"{address}: not reachable over TLS after {timeout:.0f} s: {err}"
                ) from None
            time.sleep(1.0)


def launch(
    superlink: str,
    ca: Path,
    keys: dict[str, Path],
    run_config: str,
    env: dict[str, str],
    app_dir: Path = APP_DIR,
    timeout: float = 0.0,
    poll: float = 3.0,
    wait_for: float = 120.0,
    say=print,
) -> dict:
    """Register ``keys``, ``flwr run`` the app, wait for it to end; return its ``flwr ls`` entry.

    ``env`` must carry a writable ``FLWR_HOME``; the connection is written there.

    Raises:
        LaunchError: the SuperLink is unreachable, a key was refused, or the run did not start.
        TimeoutError: the run did not finish within ``timeout`` seconds (0 = no limit).
    """
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(connection_toml(superlink, str(Path(ca).resolve())))
    wait_tls(superlink, ca, wait_for)
    for name, node in register_keys(keys, env).items():
        say(f"[launch] SuperNode {name}: {node}")
    args = ["run", str(app_dir), CONNECTION]
    if run_config:
        args += ["--run-config", run_config]
    ans = flwr_json(args, env)
    if not ans.get("success"):
        raise LaunchError(f"flwr run: {ans.get('error-message', ans)}")
    run_id = int(ans["run-id"])
    say(f"[launch] run {run_id} started (FAB {ans.get('fab-hash')})")
    try:
        entry = _wait_for_end(run_id, env, timeout, poll, say)
    except (Stopped, TimeoutError):
        _stop_run(run_id, env, say)
        raise
    return {**entry, "run-id": run_id, "fab-hash": ans.get("fab-hash")}


SUPERLINK_AWAY = 300.0  # seconds launch keeps polling a SuperLink that does not answer (restart)


def _wait_for_end(run_id: int, env: dict[str, str], timeout: float, poll: float, say) -> dict:
    """Poll ``flwr ls`` until the run has finished; its entry. A SuperLink that restarts (its
    state kept) does not answer for a while; the run goes on, and so does the polling.

    Raises:
        LaunchError: the SuperLink did not answer for ``SUPERLINK_AWAY`` seconds.
    """
    t0, status, away = time.monotonic(), "", None
    while True:
        try:
            ans = flwr_json(["ls", CONNECTION, "--run-id", str(run_id)], env)
            why = str(ans.get("error-message", "no such run"))
        except (LaunchError, subprocess.TimeoutExpired) as err:
            ans, why = {}, str(err)
        entry = (ans.get("runs") or [{}])[0]
        if not entry.get("status"):  # the SuperLink is away (or restarting): ask again
            away = away or time.monotonic()
            if time.monotonic() - away > SUPERLINK_AWAY:
                raise LaunchError(f"run {run_id}: no status for {SUPERLINK_AWAY:.0f} s: {why}")
        elif entry["status"] != status:
            away, status = None, str(entry["status"])
            say(f"[launch] run {run_id}: {status} ({time.monotonic() - t0:.0f} s)")
        else:
            away = None
        if status.startswith("finished"):
            return entry
        if timeout and time.monotonic() - t0 > timeout:
            raise TimeoutError(f"run {run_id} still {status} after {timeout:.0f} s")
        time.sleep(poll)


def _stop_run(run_id: int, env: dict[str, str], say) -> None:
    """Ask the SuperLink to stop a run this launch started (it would go on without us); the run
    folder keeps its completed phases, so the next launch resumes."""
    try:
        ans = flwr_json(["stop", str(run_id), CONNECTION], env, timeout=30)
        say(f"[launch] run {run_id}: stop requested ({'ok' if ans.get('success') else ans})")
    except (LaunchError, OSError, subprocess.SubprocessError) as err:
        say(f"[launch] run {run_id}: could not be stopped ({err}); stop it with flwr stop")


def _keys_from(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(Path(folder).glob("*.pub"))}


def launch_command(
    superlink: Annotated[str, typer.Option(help="SuperLink host:port.")],
    ca: Annotated[Path, typer.Option(help="The federation's CA certificate.")],
    register: Annotated[
        Path | None, typer.Option(help="Folder of <site>.pub SuperNode keys to register first.")
    ] = None,
    run_config: Annotated[str, typer.Option(help="flwr run --run-config overrides.")] = "",
    app: Annotated[Path, typer.Option(help="The Flower app folder.")] = APP_DIR,
    timeout: Annotated[
        float, typer.Option(help="Give up after this many seconds (0 = never).")
    ] = 0.0,
) -> None:
    """Register the SuperNode keys, start a run, wait, and exit 0 only if it finished completed."""
    env = os.environ.copy()
    env.setdefault("FLWR_HOME", str(Path.home() / ".flwr"))
    env.update(FLOWER_ENV)
    keys = _keys_from(register) if register else {}
    try:
        with stop_signals_raise():
            entry = launch(superlink, ca, keys, run_config, env, app, timeout)
    except (LaunchError, TimeoutError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(entry, indent=2))
    if entry.get("status") != "finished:completed":
        typer.echo(f"error: run {entry['run-id']} ended {entry.get('status')}", err=True)
        raise typer.Exit(1)
