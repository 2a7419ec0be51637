"""``crossprobe demo-data``: each simulated site's synthetic data in a folder of its own, as the
demo's compose ``init`` service makes it (one volume per site)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo_data(config: Path, out: Path) -> list[Path]:
    """Each site's synthetic data under ``out/<site>/<site>`` (idempotent, via ``ensure_site``)."""
    from common.config import load_experiment
    from simulations.sites import ensure_site

    cfg = load_experiment(config)
    return [ensure_site(s, cfg.model.img_size, out / s.name, progress=False) for s in cfg.sites]


def demo_data_command(
    config: Annotated[Path, typer.Option(help="Experiment YAML whose sites to synthesise.")],
    out: Annotated[Path, typer.Option(help="Root: each site goes to OUT/<site>/<site>.")],
) -> None:
    """Make each site's synthetic data in its own folder (skips sites that are already there)."""
    for p in demo_data(config, out):
        typer.echo(f"site data: {p}")
