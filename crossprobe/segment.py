"""`crossprobe segment BUNDLE INPUT... --out DIR`: a target site's fused model on new sweeps.

    crossprobe segment sites/telemed/bundle sweep.dcm sweep2.mp4 pngs/ --out segmented

BUNDLE is the folder a site keeps after evaluation (``<site output>/bundle``); each INPUT is a
DICOM cine, an MP4/AVI, a folder of PNGs or a canonical site folder. What is written per input is
listed in ``common/segment.py``. Unreadable input is an error naming the file (exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def segment_command(
    bundle: Annotated[Path, typer.Argument(help="A site's bundle folder (<site output>/bundle).")],
    inputs: Annotated[
        list[Path], typer.Argument(help="DICOM cines, MP4/AVI files, PNG folders or site folders.")
    ],
    out: Annotated[Path, typer.Option(help="Where each input's masks, overlay and CSV go.")],
    device: Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1, mps.")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1, help="Frames per forward pass.")] = 8,
    mode: Annotated[
        str | None,
        typer.Option(help="Fusion mode (entropy | margin | mean); default: the bundle's."),
    ] = None,
    onnx: Annotated[
        Path | None,
        typer.Option(help="Run the pair's graph from `crossprobe export onnx` on onnxruntime."),
    ] = None,
) -> None:
    """Segment ultrasound sweeps with the fused model a site kept; masks at each frame's size."""
    from common.bundle import load_bundle
    from common.segment import FusedSegmenter, read_sweeps, segment_sweep

    b = load_bundle(bundle)
    seg = FusedSegmenter(b, device=device, mode=mode, onnx=onnx)
    typer.echo(
        f"[segment] bundle {bundle}: {seg.name} ({'+'.join(seg.pair)}) on {seg.backend}, "
        f"threshold {seg.threshold}, run {b.card.get('run_id')}, config {b.card.get('config_hash')}"
    )
    for path in inputs:
        for sweep in read_sweeps(path):
            segment_sweep(seg, sweep, out, batch_size, say=typer.echo)
