"""``crossprobe data``: make, validate, ingest and export site datasets (canonical layout)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Make, ingest, validate and export site datasets (the canonical layout).",
)


def _fail(msg: str, code: int = 1) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


@data_app.command("synth")
def synth(
    out: Annotated[Path, typer.Option("--out", help="site folder to create")],
    preset: Annotated[
        str, typer.Option(help="source (lumify) | target (telemed) | lumify | telemed")
    ] = "source",
    role: Annotated[
        str | None, typer.Option(help="source | target (default: from the preset)")
    ] = None,
    patients: Annotated[int, typer.Option(min=1)] = 12,
    videos_per_patient: Annotated[int, typer.Option(min=1)] = 3,
    frames_per_video: Annotated[int, typer.Option(min=1)] = 40,
    size: Annotated[int, typer.Option(help="frame width in px (the model size)")] = 224,
    seed: int = 0,
    difficulty: Annotated[
        float | None, typer.Option(min=0, help="default: the preset's (source 1.0, target 2.0)")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="experiment YAML; with --site")] = None,
    site: Annotated[str | None, typer.Option(help="site name in --config")] = None,
    workers: Annotated[int, typer.Option(min=1)] = 2,
    force: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
) -> None:
    """Render a synthetic site with the phantom."""
    from common.config import SiteConfig, SynthConfig, load_experiment
    from simulations.sites import synth_site

    if config is not None:
        exp = load_experiment(config)
        sites = {s.name: s for s in exp.sites}
        if site not in sites:
            _fail(f"{config}: no site {site!r} (sites: {sorted(sites)})", 2)
        sc = sites[site]
        if sc.synth is None:
            _fail(f"{config}: site {site!r} has no synth section", 2)
        img = exp.model.img_size
    else:
        r = role or ("target" if preset in ("target", "telemed") else "source")
        name = out.name if out.name else "site"
        try:
            sc = SiteConfig(
                name=name,
                role=r,
                synth=SynthConfig(
                    preset=preset,
                    patients=patients,
                    videos_per_patient=videos_per_patient,
                    frames_per_video=frames_per_video,
                    difficulty=difficulty,
                    seed=seed,
                ),
            )
        except ValueError as err:
            _fail(str(err), 2)
        img = size
    try:
        p = synth_site(sc, img, out, workers=workers, overwrite=force)
    except (FileExistsError, KeyError) as err:
        _fail(str(err).strip("'\""), 2)
    from common.data.manifest import load_site

    typer.echo(load_site(p, check="none").card_text())


@data_app.command("validate")
def validate(
    site_dir: Annotated[Path, typer.Argument(help="canonical site folder")],
    quick: Annotated[bool, typer.Option(help="check file headers only, do not decode")] = False,
) -> None:
    """Check a site folder (every file decodes, masks match frames) and print its card."""
    from common.data.manifest import DataError, load_site

    try:
        s = load_site(site_dir, check="headers" if quick else "full")
    except DataError as err:
        _fail(str(err))
    typer.echo(s.card_text())


@data_app.command("ingest")
def ingest_cmd(
    inputs: Annotated[list[Path], typer.Argument(help="videos: DICOM cine, MP4/AVI, PNG folders")],
    out: Annotated[Path, typer.Option("--out", help="site folder to create")],
    name: Annotated[str | None, typer.Option(help="site name (default: --out's name)")] = None,
    role: Annotated[str, typer.Option(help="source | target")] = "target",
    device: Annotated[str, typer.Option(help="device name recorded per frame")] = "",
    split: Annotated[
        str, typer.Option(help="auto (by patient, seeded) | train | val | test")
    ] = "auto",
    seed: int = 0,
    all_labeled: Annotated[
        bool, typer.Option(help="every frame of a NIfTI-labeled video is labeled")
    ] = False,
    authors: Annotated[
        bool, typer.Option(help="the single input is an authors' Images/+Masks/+CSV folder")
    ] = False,
) -> None:
    """Convert real data into the canonical layout (labels from NIfTI or masks/ folders)."""
    from common.data.ingest import import_authors, ingest
    from common.data.manifest import DataError, load_site

    nm = name or out.name
    try:
        if authors:
            if len(inputs) != 1:
                _fail("--authors takes exactly one input folder", 2)
            p = import_authors(inputs[0], out, nm, role, device)
        else:
            p = ingest(
                inputs,
                out,
                nm,
                role,
                device,
                split=split,
                seed=seed,
                all_labeled=all_labeled,
                command=" ".join(sys.argv),
            )
        typer.echo(load_site(p).card_text())
    except DataError as err:
        _fail(str(err))
    except ImportError as err:
        _fail(f"{err}; install the readers with: pip install 'crossprobe[ingest]'", 2)


@data_app.command("export")
def export_cmd(
    site_dir: Annotated[Path, typer.Argument(help="canonical site folder")],
    out: Annotated[Path, typer.Option("--out")],
    layout: Annotated[str, typer.Option(help="authors (Images/ + Masks/ + CSVs)")] = "authors",
) -> None:
    """Write a site in another layout (the authors' code reads Images/, Masks/ and CSVs)."""
    from common.data.ingest import export_authors
    from common.data.manifest import DataError

    if layout != "authors":
        _fail(f"unknown layout {layout!r} (known: authors)", 2)
    try:
        p = export_authors(site_dir, out)
    except DataError as err:
        _fail(str(err))
    typer.echo(f"wrote {p}")
