"""`crossprobe simulate`: the whole federated study on simulated sites, with Flower's own runtime.

It makes each site's synthetic data in that site's own folder (if absent), runs
``flwr run <app> local --stream`` (managed local SuperLink in simulation mode, one SuperNode per
site, run-local ``FLWR_HOME``, free ports, no runtime dependency installation, no telemetry),
decides success from ``flwr ls`` (``flwr run --stream`` exits 0 even when the run failed), always
stops the SuperLink / Ray processes it started, and leaves everything in ``runs/NAME/``:

    report.md, results.json   written by the ServerApp only when the run completed
    config.yaml               the experiment used;   run-config.toml  the run settings used
    phases.json, phases/      completed phases (a rerun resumes after the last one)
    simulate.json             status, run id, wall time, per-phase timings and bytes
    data/<site>/              each site's data;      sites/<site>/   each site's local artifacts
    .flwr/                    FLWR_HOME (SuperLink state and log)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from common.lock import LOCK_NAME, locked
from common.signals import stop_signals_raise

APP_DIR = Path(__file__).resolve().parents[1]
_RUN_ID = re.compile(r"run\s+(?:ID\s+)?(\d{6,})", re.IGNORECASE)


class SimulationError(RuntimeError):
    """The simulated run did not complete; the message says where to look."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower command of one simulated run (run-local home, free ports)."""
    env = os.environ.copy()
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
        PYTHONUNBUFFERED="1",
    )
    # The ServerApp/ClientApp processes import the app from its FAB folder; keep the repo importable
    # too (stages, data) when crossprobe is not pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(APP_DIR), env.get("PYTHONPATH", "")) if p)
    bindir = Path(sys.executable).parent
    env["PATH"] = os.pathsep.join(
        (str(bindir), env.get("PATH", ""))
    )  # flower-superlink of this env
    return env


# ------------------------------------------------------------------ process bookkeeping
def _procs() -> dict[int, tuple[int, int, str, bytes]]:
    """pid -> (ppid, session id, command line, environment) for every visible process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        out[int(d.name)] = (int(fields[1]), int(fields[3]), cmd, env)
    return out


def started_processes(flwr_home: Path) -> list[int]:
    """Processes of this run: every process whose environment carries this run's ``FLWR_HOME``
    (the managed SuperLink, ServerApp, simulation, Ray's GCS, raylet and actors all inherit it),
    plus the SuperLink's session and descendants in case one of them cleared its environment."""
    procs = _procs()
    marker = f"FLWR_HOME={flwr_home}".encode()
    found = {pid for pid, (*_, env) in procs.items() if marker in env.split(b"\0")}
    roots = {
        pid
        for pid, (_, _, cmd, _) in procs.items()
        if "flower-superlink" in cmd and str(flwr_home) in cmd
    }
    sessions = {procs[r][1] for r in roots}
    found |= roots | {pid for pid, (_, sid, _, _) in procs.items() if sid in sessions}
    grew = True
    while grew:
        kids = {pid for pid, (ppid, *_) in procs.items() if ppid in found} - found
        found |= kids
        grew = bool(kids)
    pid = os.getpid()  # never this process or the shell/pytest above it
    while pid > 1 and pid in procs:
        found.discard(pid)
        pid = procs[pid][0]
    return sorted(p for p in found if not _zombie(p))


def stop_processes(flwr_home: Path, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process :func:`started_processes` finds. Returns their pids."""
    pids = started_processes(flwr_home)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in pids if Path(f"/proc/{p}").exists()]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)]
            time.sleep(0.1)
        if not alive:
            break
    return pids


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] == "Z"
    except OSError:
        return True


# ------------------------------------------------------------------ the command
def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))  # Flower wants e.g. num-cpus as an int
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def run_status(flwr: str, run_id: int, env: dict[str, str]) -> dict:
    """The run's entry from ``flwr ls local --run-id X --format json``."""
    res = subprocess.run(
        [flwr, "ls", "local", "--run-id", str(run_id), "--format", "json"],
        env=env,
        cwd=APP_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise SimulationError(
            f"flwr ls gave no JSON: {res.stdout[-500:]} {res.stderr[-500:]}"
        ) from None
    runs = data.get("runs", [])
    return runs[0] if runs else data


def _run_folder(cfg, config: Path, run_dir: Path | None) -> Path:
    """The run folder, created if needed.

    Raises:
        typer.BadParameter: no sites to simulate, or the folder cannot be created or written (it
            is a file, or on a read-only disk).
    """
    if not cfg.sites:
        raise typer.BadParameter(
            f"{config}: the experiment lists no sites to simulate", param_hint="config"
        )
    run_dir = (run_dir or Path("runs") / cfg.name).resolve()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise typer.BadParameter(
            f"{run_dir}: cannot be used as a run folder ({err.strerror or err})",
            param_hint="--run-dir",
        ) from None
    if not (APP_DIR / "pyproject.toml").is_file():
        raise SimulationError(f"{APP_DIR}: no pyproject.toml; run from a checkout of crossprobe")
    return run_dir


def _empty_run_folder(run_dir: Path) -> None:
    """``--fresh``: delete what an earlier run left, only if it is a crossprobe run folder."""
    children = [p for p in run_dir.iterdir() if p.name != LOCK_NAME]
    if children and not (run_dir / "phases.json").exists():
        raise typer.BadParameter(f"{run_dir} is not a crossprobe run folder; not deleting it")
    for p in children:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _flwr_command(config: Path, run_dir: Path, sites_root: Path, n: int, cpus: float, env) -> list:
    """``flwr run <app> local --stream`` with the federation size and this run's settings (written
    to ``run-config.toml`` in the run folder)."""
    run_config = {
        "experiment": str(Path(config).resolve()),
        "run-dir": str(run_dir),
        "sites-root": str(sites_root),
    }
    rc_path = run_dir / "run-config.toml"
    rc_path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
    flwr = shutil.which("flwr", path=env["PATH"]) or "flwr"
    return [
        flwr,
        "run",
        str(APP_DIR),
        "local",
        "--stream",
        "--federation-config",
        f"num-supernodes={n} client-resources-num-cpus={_toml_value(cpus)}",
        "--run-config",
        str(rc_path),
    ]


def _stream_run(cmd: list, env, flwr_home: Path, t0: float, timeout: float) -> int:
    """Run ``flwr run --stream``, echo its output, return the run id it started.

    Raises:
        SimulationError: no run was started, or ``timeout`` seconds passed.
    """
    run_id: int | None = None
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=APP_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        if run_id is None and (m := _RUN_ID.search(line)):
            run_id = int(m.group(1))
        if timeout and time.monotonic() - t0 > timeout:
            proc.kill()
            raise SimulationError(f"gave up after {timeout:.0f} s (run {run_id})")
    proc.wait()
    if run_id is None:
        raise SimulationError(
            f"flwr run did not start a run (exit code {proc.returncode}); "
            f"see {flwr_home / 'local-superlink' / 'superlink.log'}"
        )
    return run_id


def _verdict(summary: dict, run_dir: Path, say) -> None:
    """Write ``simulate.json``; raise unless the run finished completed.

    Raises:
        SimulationError: naming the reason the ServerApp recorded in ``FAILED.json``.
    """
    phases_file = run_dir / "phases.json"
    if phases_file.exists():
        summary["phases"] = json.loads(phases_file.read_text())["completed"]
    (run_dir / "simulate.json").write_text(json.dumps(summary, indent=2) + "\n")
    run_id, status = summary["run_id"], summary["status"]
    if status != "finished:completed":
        failed = run_dir / "FAILED.json"
        why = json.loads(failed.read_text())["error"] if failed.exists() else "see the log above"
        say(f"run {run_id} ended {status}: {why}")
        raise SimulationError(f"run {run_id} did not complete ({status}): {why}")
    say(f"run {run_id} finished:completed in {summary['seconds']} s → {run_dir / 'report.md'}")


def run_simulation(
    config: Path,
    run_dir: Path | None = None,
    fresh: bool = False,
    cpus_per_site: float = 0.0,
    timeout: float = 0.0,
    sites_root: Path | None = None,
) -> dict:
    """Run the study; returns the summary written to ``simulate.json``. Site data is made under
    ``sites_root`` (default ``<run_dir>/data``; runs of one study share theirs).

    Raises:
        SimulationError: the run did not finish completed (the message names site and phase when
            the ServerApp recorded them), or Flower could not start.
    """
    from common.config import load_experiment

    t0 = time.monotonic()

    def say(text: str) -> None:
        typer.echo(f"[simulate {time.monotonic() - t0:7.1f}s] {text}")

    cfg = load_experiment(config)
    run_dir = _run_folder(cfg, config, run_dir)
    with locked(run_dir, "crossprobe simulate"), stop_signals_raise():
        if fresh:
            _empty_run_folder(run_dir)
        summary = _simulate(cfg, config, run_dir, sites_root, cpus_per_site, timeout, t0, say)
    _verdict(summary, run_dir, say)
    return summary


def _simulate(cfg, config, run_dir, sites_root, cpus_per_site, timeout, t0, say) -> dict:
    """Make the sites' data, run Flower, stop every process it started whatever happens."""
    from common.fl.signing import ensure_site_keys
    from simulations.sites import ensure_site

    sites_root = Path(sites_root).resolve() if sites_root else run_dir / "data"
    for site in cfg.sites:  # each site's data in its own folder
        say(f"site {site.name} ({site.role}): data")
        say(f"site {site.name}: {ensure_site(site, cfg.model.img_size, sites_root)}")
    # each simulated site signs its replies with its own key; the server verifies them
    ensure_site_keys(run_dir / "keys", [site.name for site in cfg.sites])
    flwr_home = run_dir / ".flwr"
    flwr_home.mkdir(exist_ok=True)
    env = flower_env(flwr_home)
    # one ClientApp with every core beat two side by side with one core each (demo: 500 vs 521 s)
    cpus = cpus_per_site or float(os.cpu_count() or 1)
    cmd = _flwr_command(config, run_dir, sites_root, len(cfg.sites), cpus, env)
    say(f"flwr run: {len(cfg.sites)} SuperNodes, FLWR_HOME={flwr_home}")
    run_id, status, t_run = None, {}, time.monotonic()
    summary: dict = {"config": str(Path(config).resolve()), "run_dir": str(run_dir), "command": cmd}
    try:
        run_id = _stream_run(cmd, env, flwr_home, t0, timeout)
        status = run_status(cmd[0], run_id, env)
    finally:
        stopped = stop_processes(flwr_home)
        if stopped:
            say(f"stopped {len(stopped)} Flower/Ray process(es)")
    summary.update(
        run_id=run_id,
        status=status.get("status"),
        flwr_seconds=round(time.monotonic() - t_run, 1),
        seconds=round(time.monotonic() - t0, 1),
    )
    return summary


def simulate_command(
    config: Annotated[
        Path, typer.Option(help="Experiment YAML (configs/tiny|demo|paper.yaml).")
    ] = Path("configs/demo.yaml"),
    run_dir: Annotated[
        Path | None, typer.Option(help="Run folder (default runs/<experiment name>).")
    ] = None,
    fresh: Annotated[
        bool, typer.Option(help="Delete the run folder first instead of resuming.")
    ] = False,
    cpus_per_site: Annotated[
        float,
        typer.Option(
            help="CPUs (torch threads) Ray gives each ClientApp; 0 = all of them, one message at a "
            "time (measured fastest on 2 cores); lower it to run sites side by side."
        ),
    ] = 0.0,
    timeout: Annotated[
        float, typer.Option(help="Give up after this many seconds (0 = never).")
    ] = 0.0,
) -> None:
    """Run the whole federated study on simulated sites with Flower's simulation runtime."""
    try:
        run_simulation(config, run_dir, fresh, cpus_per_site, timeout)
    except SimulationError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
