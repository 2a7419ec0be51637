"""`crossprobe bench-memory`: peak resident memory of every process of a real `crossprobe simulate`
run (the ServerApp, each ClientApp worker, Ray's own processes), sampled from /proc.

For a big model the weight exchange, not training, can decide whether a site's machine copes: a
state dict becomes an ArrayRecord, bytes on the wire, a ledger hash and a file, and each step may
hold one more copy. Run it with ``configs/paper-memory.yaml`` (the paper model, a few frames, one
step per stage) to see those copies at paper size; the figures are per process, in GiB, beside the
model's fp32 size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import typer

KINDS = (  # (what the report calls it, a piece of its command line), first match wins
    ("clientapp", "ray/_private/workers"),  # a Ray worker runs the ClientApps in simulation
    ("clientapp", "flwr-clientapp"),
    ("serverapp", "flwr-simulation"),  # the ServerApp and the simulation's message relay
    ("serverapp", "flwr-serverapp"),
    ("superlink", "flower-superlink"),
    ("superlink", "crossprobe-superlink"),
    ("ray", "ray/"),
    ("ray", "raylet"),
    ("ray", "gcs_server"),
    ("simulate", "crossprobe"),
)


def _children(pid: int) -> set[int]:
    """``pid`` and every process below it."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        todo += parents.get(p, [])
    return found


_FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssShmem": "shmem"}


def _memory_gib(pid: int) -> tuple[dict[str, float], str] | None:
    """Resident memory of ``pid`` now, in GiB, and its command line; None once it is gone.

    ``rss`` is what ``top`` shows; ``anon`` is its private heap (where copies of weights live);
    ``shmem`` is shared memory it has touched (Ray's object store, counted again in every process
    that maps it); ``pss`` shares each shared page among the processes that map it, so the ``pss``
    of all processes adds up to the machine's memory in use."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        cmd = (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return None
    out = {}
    for line in status.splitlines() + rollup.splitlines():
        key, _, value = line.partition(":")
        name = _FIELDS.get(key) or ("pss" if key == "Pss" else None)
        if name and value.strip().endswith("kB"):
            out[name] = int(value.split()[0]) / 2**20
    return (out, cmd) if "rss" in out else None


def kind_of(cmdline: str) -> str:
    return next((kind for kind, part in KINDS if part in cmdline), "other")


def measure(argv: list[str], every_s: float = 0.5, log=print) -> dict:
    """Run ``argv``, sampling the resident memory of it and its descendants; returns the peak per
    process (with its kind) and the peak of their sum."""
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    proc = subprocess.Popen(argv, env=env)
    peaks: dict[int, dict] = {}
    total_peak, t0 = 0.0, time.monotonic()
    while proc.poll() is None:
        total, t = 0.0, round(time.monotonic() - t0, 1)
        for pid in _children(proc.pid):
            now = _memory_gib(pid)
            if now is None:
                continue
            gib, cmd = now
            total += gib.get("pss", gib["rss"])
            seen = peaks.setdefault(
                pid, {"kind": kind_of(cmd), "cmd": cmd[:120], "peak_gib": 0, "timeline": []}
            )
            if gib["rss"] > seen["peak_gib"]:
                seen.update(peak_gib=gib["rss"], at_peak={k: round(v, 3) for k, v in gib.items()})
            if gib["rss"] > 0.5:  # when the big ones grow and shrink: (seconds, rss, anon, shmem)
                seen["timeline"].append(
                    (t, *(round(gib.get(k, 0.0), 2) for k in ("rss", "anon", "shmem")))
                )
        total_peak = max(total_peak, total)
        time.sleep(every_s)
    by_kind: dict[str, dict] = {}  # kind -> its biggest process at its peak
    for p in peaks.values():
        if p["peak_gib"] > by_kind.get(p["kind"], {}).get("rss", -1.0):
            by_kind[p["kind"]] = p.get("at_peak", {"rss": p["peak_gib"]})
    log(f"[bench-memory] exit {proc.returncode} after {time.monotonic() - t0:.0f} s; "
        f"peak of all processes {total_peak:.2f} GiB (shared pages counted once)")  # fmt: skip
    return {
        "exit_code": proc.returncode,
        "seconds": time.monotonic() - t0,
        "peak_all_gib": total_peak,
        "peak_by_kind_gib": by_kind,
        "processes": sorted(peaks.values(), key=lambda p: -p["peak_gib"]),
    }


def model_fp32_gib(config: Path) -> float:
    """The fp32 size of the config's TransUNet's state dict, in GiB."""
    from common.config import load_experiment
    from common.models import build_transunet

    net = build_transunet(load_experiment(config).model)
    return sum(t.numel() * 4 for t in net.state_dict().values()) / 2**30


def bench_memory_command(
    config: Path = typer.Option(Path("configs/paper-memory.yaml"), help="Experiment YAML."),
    run_dir: Path = typer.Option(Path("runs/bench-memory"), help="The simulate run folder."),
    out: Path = typer.Option(Path("bench-memory.json"), help="Where the figures go (JSON)."),
) -> None:
    """Peak resident memory per process of `crossprobe simulate --fresh` on CONFIG."""
    argv = [sys.executable, "-m", "crossprobe", "simulate", "--config", str(config),
            "--run-dir", str(run_dir), "--fresh"]  # fmt: skip
    res = {"config": str(config), "model_fp32_gib": model_fp32_gib(config), **measure(argv)}
    out.write_text(json.dumps(res, indent=2))
    model = res["model_fp32_gib"]
    for kind, gib in sorted(res["peak_by_kind_gib"].items()):
        typer.echo(
            f"{kind:12s} peak {gib['rss']:6.2f} GiB ({gib['rss'] / model:4.1f}x the model): "
            f"private {gib.get('anon', 0):5.2f}, shared {gib.get('shmem', 0):5.2f}"
        )
    typer.echo(
        f"{'all':12s} peak {res['peak_all_gib']:6.2f} GiB; model {res['model_fp32_gib']:.2f} GiB"
    )
    if res["exit_code"]:
        raise typer.Exit(res["exit_code"])
