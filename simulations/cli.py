"""The `crossprobe` command line. Sub-commands import their code lazily so `--help` stays fast."""

from __future__ import annotations

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


def _register() -> None:
    from simulations.bench import bench_command

    app.command("bench", help="Training images/s per stage and fused-inference frames/s.")(
        bench_command
    )
    try:
        from simulations.data_cli import data_app
    except ImportError:  # pragma: no cover - only while the data package is being built
        data_app = None
    if data_app is not None:
        app.add_typer(
            data_app, name="data", help="Make, ingest, validate and export site datasets."
        )
    try:
        from simulations.simulate import simulate_command
    except ImportError:  # pragma: no cover
        simulate_command = None
    if simulate_command is not None:
        app.command("simulate", help="Run the whole federated study on simulated sites.")(
            simulate_command
        )


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
