"""The ``crossprobe`` command line: one table of every command, each imported only when it runs.

``crossprobe --help`` and ``crossprobe <command> --help`` import no torch, no Flower and no command
module but the one asked for, so help is instant. A command whose module fails to import is an
error naming it, never a command that silently goes missing. Tracebacks never print local
variables (a passphrase, a key or a secret may be one of them).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import click
import typer
import typer.core
import typer.main


@dataclass(frozen=True)
class Command:
    module: str
    attr: str  # a function (one command) or a typer.Typer (a group of commands)
    help: str


COMMANDS: dict[str, Command] = {
    "simulate": Command(
        "simulations.simulate",
        "simulate_command",
        "Run the whole federated study on simulated sites.",
    ),
    "experiment": Command(
        "simulations.experiment",
        "experiment_command",
        "Run a study over seeds (paper Tables 3–8) with per-video statistics.",
    ),
    "data": Command(
        "crossprobe.data", "data_app", "Make, ingest, validate and export site datasets."
    ),
    "audit": Command(
        "crossprobe.audit",
        "audit_command",
        "Check that only weights and scalars crossed (ledgers).",
    ),
    "certs": Command(
        "deploy.certs", "certs_command", "Create TLS certificates and SuperNode keys."
    ),
    "preflight": Command(
        "deploy.preflight", "preflight_command", "Check a site is ready to join a federation."
    ),
    "launch": Command(
        "deploy.launch", "launch_command", "Register SuperNode keys, start a run, wait for its end."
    ),
    "compose": Command(
        "deploy.compose", "compose_command", "Print or --write the generated compose files."
    ),
    "segment": Command(
        "crossprobe.segment",
        "segment_command",
        "Segment new sweeps with the fused model a site kept after evaluation.",
    ),
    "export": Command(
        "crossprobe.export", "export_app", "Export a site's fused model (ONNX), checked."
    ),
    "demo-data": Command(
        "simulations.demo_data",
        "demo_data_command",
        "Make each demo site's synthetic data in a folder of its own.",
    ),
    "bench": Command(
        "simulations.bench",
        "bench_command",
        "Training images/s per stage and fused-inference frames/s.",
    ),
    "bench-signing": Command(
        "simulations.bench_signing",
        "bench_signing_command",
        "What checking, hashing and signing one reply costs.",
    ),
    "bench-memory": Command(
        "simulations.bench_memory",
        "bench_memory_command",
        "Peak resident memory of every process of a simulate run.",
    ),
    "encoder-drift": Command(
        "simulations.encoder_drift",
        "encoder_drift_command",
        "How far fine-tuning moved each pretrained encoder (linear CKA on target frames).",
    ),
    "bench-pipeline": Command(
        "simulations.pipeline",
        "pipeline_command",
        "The study's stages in process, without Flower (overhead reference).",
    ),
}


class CommandImportError(click.ClickException):
    """A command's module could not be imported (a broken install or dependency)."""


def load_command(name: str) -> click.Command:
    """The click command behind ``name``, importing its module now.

    Raises:
        CommandImportError: the module or its attribute is missing (the message names both).
    """
    spec = COMMANDS[name]
    try:
        obj = getattr(importlib.import_module(spec.module), spec.attr)
    except (ImportError, AttributeError) as err:
        raise CommandImportError(
            f"command {name!r} cannot load {spec.module}.{spec.attr}: {err}"
        ) from err
    if isinstance(obj, typer.Typer):
        cmd = typer.main.get_command(obj)
    else:
        one = typer.Typer(pretty_exceptions_show_locals=False)
        one.command(name, help=spec.help)(obj)
        cmd = typer.main.get_command(one)
    cmd.name = name
    if isinstance(cmd, click.Group) and not cmd.help:
        cmd.help = spec.help
    return cmd


class LazyGroup(typer.core.TyperGroup):
    """A group whose commands are imported on first use; help lists them from ``COMMANDS``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return load_command(name) if name in COMMANDS else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, spec.help) for name, spec in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


app = typer.Typer(
    cls=LazyGroup,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,
    help="crossprobe: cross-probe ultrasound bone segmentation, federated across isolated sites.",
)


@app.callback()
def _root() -> None:
    """crossprobe: cross-probe ultrasound bone segmentation, federated across isolated sites."""


# Exit codes of every command (audit and preflight add their own, documented with them).
EXIT_FAILED = 1  # the run (or check) ran and failed
EXIT_BAD_INPUT = 2  # a config, data folder, argument or run folder that cannot be used


def main() -> None:
    """The console script. A bad config, data folder or busy run folder is one line naming the
    file, key or holder (exit 2); a stop by SIGINT/SIGTERM/SIGHUP exits 128 + the signal after
    everything the command started has been stopped."""
    from common.errors import UserError
    from common.signals import Stopped

    try:
        app()
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except Stopped as stop:
        typer.echo(f"stopped by {stop}: what the command started was stopped", err=True)
        sys.exit(128 + stop.signum)


if __name__ == "__main__":  # pragma: no cover
    main()
