"""`crossprobe export onnx BUNDLE --out FILE`: the fused pair a site kept, as one ONNX graph,
checked against torch with onnxruntime before it is called done (``common/onnx_export.py``).

    crossprobe export onnx out/run-7/bundle --out fused.onnx --site data/telemed

With ``--site`` the check runs on that site's test frames (the ones the bundle was scored on);
without, on random frames (and says so). Exit 1 when the graph and torch disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

export_app = typer.Typer(help="Export a site's fused model for other runtimes.",
                         no_args_is_help=True, pretty_exceptions_show_locals=False)  # fmt: skip


@export_app.callback()
def _export() -> None:
    """Export a site's fused model for other runtimes."""


def _check_frames(site: Path | None, size: int, n: int):
    import torch

    if site is None:
        return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)), "random"
    import numpy as np
    from PIL import Image

    from common.data.manifest import DataError, load_site
    from common.data.transforms import preprocess_image

    data = load_site(site)
    rows = data.select(split="test") or data.rows
    if not rows:
        raise DataError(f"{site}: no frames to check the export on")
    images = []
    for r in rows[:n]:
        with Image.open(data.path(r.image_path)) as im:
            images.append(preprocess_image(np.asarray(im.convert("L")), size))
    return torch.stack(images), f"{len(images)} test frames of {data.name}"


@export_app.command("onnx")
def onnx_command(
    bundle: Annotated[Path, typer.Argument(help="A site's bundle folder (<site output>/bundle).")],
    out: Annotated[Path, typer.Option(help="The .onnx file (its weights go to FILE.data).")],
    site: Annotated[
        Path | None, typer.Option(help="A site folder whose test frames the check runs on.")
    ] = None,
    frames: Annotated[int, typer.Option(min=1, help="How many frames the check uses.")] = 32,
    mode: Annotated[str | None, typer.Option(help="Fusion mode; default: the bundle's.")] = None,
) -> None:
    """Export the fused pair (both branches, the fusion, a dynamic batch); check it with ORT."""
    import time

    from common.bundle import load_bundle
    from common.onnx_export import (
        MASK_AGREEMENT,
        PROB_TOL,
        check_parity,
        export_onnx,
        fused_pair,
    )

    b = load_bundle(bundle)
    t0 = time.perf_counter()
    record = export_onnx(b, out, mode)
    typer.echo(f"[export] {out}: opset {record['opset']}, {', '.join(record['files'])} "
               f"in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    images, what = _check_frames(site, b.cfg.model.img_size, frames)
    parity = check_parity(out, fused_pair(b, mode), images, b.card["threshold"])
    typer.echo(
        f"[export] onnxruntime vs torch on {what}: branches within {parity.max_branch_diff:.2e}, "
        f"fused within {parity.max_fused_diff:.2e} (tolerance {PROB_TOL:g}; "
        f"{parity.ill_conditioned:.2%} of pixels ill-conditioned), masks "
        f"{parity.mask_agreement:.4%} equal (need {MASK_AGREEMENT:.1%})"
    )
    if not parity.ok:
        typer.echo("error: the ONNX graph does not reproduce torch", err=True)
        raise typer.Exit(1)
