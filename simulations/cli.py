"""The `crossprobe` command line. Sub-commands import their code lazily so `--help` stays fast."""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="crossprobe: cross-probe ultrasound bone segmentation, federated.",
)


@app.callback()
def _root() -> None:
    """crossprobe: cross-probe ultrasound bone segmentation, federated across isolated sites."""


# name -> (module, attribute, help); a typer.Typer attribute becomes a command group
COMMANDS = {
    "simulate": (
        "simulations.simulate",
        "simulate_command",
        "Run the whole federated study on simulated sites.",
    ),
    "experiment": (
        "simulations.experiment",
        "experiment_command",
        "Run a study over seeds (paper Tables 3–8) with per-video statistics.",
    ),
    "data": (
        "simulations.data_cli",
        "data_app",
        "Make, ingest, validate and export site datasets.",
    ),
    "audit": (
        "simulations.audit_cli",
        "audit_command",
        "Check that only weights and scalars crossed (ledgers).",
    ),
    "certs": ("simulations.deploy", "certs_command", "Create TLS certificates and SuperNode keys."),
    "preflight": (
        "simulations.deploy",
        "preflight_command",
        "Check a site is ready to join a federation.",
    ),
    "bench": (
        "simulations.bench",
        "bench_command",
        "Training images/s per stage and fused-inference frames/s.",
    ),
    "bench-pipeline": (
        "simulations.bench",
        "pipeline_command",
        "The study's stages in process, without Flower (overhead reference).",
    ),
}


def _register() -> None:
    for name, (module, attr, help_text) in COMMANDS.items():
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):  # a command whose module is not built yet
            continue
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=name, help=help_text)
        else:
            app.command(name, help=help_text)(obj)


def main() -> None:
    _register()
    from common.config import ConfigError

    try:
        app()
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
