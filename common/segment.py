"""`crossprobe segment`: the target site's fused model on new sweeps.

Each input (a DICOM cine, an MP4/AVI, a folder of PNGs, or a canonical site folder's videos) is
read with the ingest readers, preprocessed exactly as in training and evaluation, run through the
bundle's two branches and fused with ``common.stages.predict`` — the code evaluation scores — and
the fused probability is taken back to each frame's own size (the padding and resizing undone).

Per input, under ``<out>/<name>/``:
    masks/<frame:05d>.png   the bone mask at the frame's size (255 = bone)
    mask.nii.gz             the same masks as one volume, for a DICOM input (ITK-SNAP opens it)
    overlay.mp4             the frames with the mask's outline
    frames.csv              per frame: bone area, mean fused probability, and a label-free
                            confidence: the two branches' agreement (Dice between their masks)
                            and the fused map's mean entropy; ``flag`` marks frames whose branches
                            disagree (agreement below ``AGREEMENT_FLAG``)
"""

from __future__ import annotations

import csv
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import arms
from common.bundle import Bundle
from common.config import FusionMode
from common.data.manifest import DataError
from common.data.transforms import preprocess_image
from common.errors import UserError

AGREEMENT_FLAG = 0.5  # branch Dice below this: the two pretrainings see different bones
CSV_COLUMNS = (
    "frame",
    "bone_area_px",
    "bone_area_mm2",
    "mean_fused_prob",
    "mean_entropy",
    "branch_agreement",
    "flag",
)


@dataclass
class Sweep:
    """One input to segment: its grey frames (T, H, W) uint8, a name, and what it came from."""

    name: str
    frames: np.ndarray
    kind: str  # dicom | video | png | site
    spacing_mm: tuple[float | None, float | None] = (None, None)


def read_sweeps(path: Path) -> Iterator[Sweep]:
    """The sweeps in ``path``: one for a file or a PNG folder, one per video for a site folder.

    Raises:
        DataError: unreadable input, naming the file.
    """
    from common.data.ingest import VIDEO_EXT, read_any

    path = Path(path)
    if (path / "dataset.yaml").is_file():
        yield from _site_sweeps(path)
        return
    cine = read_any(path)
    kind = "png" if path.is_dir() else ("video" if path.suffix.lower() in VIDEO_EXT else "dicom")
    yield Sweep(path.stem if path.is_file() else path.name, cine.frames, kind, cine.spacing_mm)


def _site_sweeps(root: Path) -> Iterator[Sweep]:
    from PIL import Image

    from common.data.manifest import load_site

    site = load_site(root)
    videos: dict[tuple[str, str], list] = {}
    for row in site.rows:
        videos.setdefault((row.patient_id, row.video_id), []).append(row)
    for (patient, video), rows in sorted(videos.items()):
        rows.sort(key=lambda r: r.frame_index)
        frames = []
        for r in rows:
            try:
                frames.append(np.asarray(Image.open(site.path(r.image_path)).convert("L")))
            except OSError as err:
                raise DataError(f"{site.path(r.image_path)}: unreadable frame ({err})") from None
        spacing = (rows[0].spacing_x_mm, rows[0].spacing_y_mm)
        yield Sweep(f"{patient}-{video}", np.stack(frames), "site", spacing)


def _to_frame_size(p: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(S, S) map at model size → (h, w): resized to the padded square, the padding cut off."""
    m = max(h, w)
    up = F.interpolate(p[None, None], size=(m, m), mode="bilinear", align_corners=False)
    return up[0, 0, :h, :w]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    q = p.clamp(1e-6, 1 - 1e-6)
    return -(q * q.log2() + (1 - q) * (1 - q).log2())


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    inter, total = float((a & b).sum()), float(a.sum() + b.sum())
    return 1.0 if total == 0 else 2 * inter / total


@dataclass
class FrameResult:
    mask: np.ndarray  # (H, W) bool at the frame's size
    row: dict[str, float | int | str]


class FusedSegmenter:
    """A bundle's two branches on one device, fused the way evaluation fuses them — in torch, or
    in the bundle's exported ONNX graph on onnxruntime (``onnx``: faster on a CPU)."""

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        mode: str | None = None,
        onnx: Path | None = None,
    ):
        from common.stages import load_models

        mode = mode or bundle.mode
        if mode not in typing.get_args(FusionMode):
            raise UserError(f"fusion mode {mode!r}: expected one of {typing.get_args(FusionMode)}")
        fusion = bundle.cfg.fusion.model_copy(update={"modes": (mode,)})
        self.cfg = bundle.cfg.model_copy(update={"fusion": fusion})
        self.device = torch.device(device)
        self.pair, self.mode = bundle.pair, mode
        self.threshold = float(bundle.card.get("threshold", fusion.threshold))
        self.name = arms.fusion_name(mode, self.pair)
        self.session = _onnx_session(onnx, bundle, mode) if onnx else None
        self.nets = {} if self.session else load_models(self.cfg, bundle.states, self.device)
        self.backend = "onnxruntime" if self.session else f"torch ({self.device})"

    def probabilities(self, images: torch.Tensor):
        """(fused, branch a, branch b) probabilities, each (B, S, S) on the CPU."""
        if self.session is not None:
            out = self.session.run(None, {"images": images.cpu().numpy()})
            return tuple(torch.from_numpy(o[:, 0]) for o in out)
        from common.stages import predict

        images = images.to(self.device)
        if self.cfg.runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        probs, _ = predict(self.cfg, self.nets, images, [self.pair], self.device)
        return tuple(probs[n][:, 0].float().cpu() for n in (self.name, *self.pair))

    @torch.inference_mode()
    def frames(self, sweep: Sweep, batch_size: int = 8) -> Iterator[FrameResult]:
        size = self.cfg.model.img_size
        sx, sy = sweep.spacing_mm
        px_mm2 = sx * sy if sx and sy else None
        for start in range(0, len(sweep.frames), batch_size):
            chunk = sweep.frames[start : start + batch_size]
            images = torch.stack([preprocess_image(f, size) for f in chunk])
            fused, pa, pb = self.probabilities(images)
            for i, frame in enumerate(chunk):
                h, w = frame.shape
                p = _to_frame_size(fused[i], h, w)
                mask = p >= self.threshold
                area = int(mask.sum())
                yield FrameResult(
                    mask.numpy(),
                    {
                        "frame": start + i,
                        "bone_area_px": area,
                        "bone_area_mm2": round(area * px_mm2, 3) if px_mm2 else "",
                        "mean_fused_prob": round(float(p[mask].mean()) if area else 0.0, 4),
                        "mean_entropy": round(float(_entropy(p).mean()), 4),
                        "branch_agreement": round(
                            _agreement(pa[i] >= self.threshold, pb[i] >= self.threshold), 4
                        ),
                    },
                )


def _onnx_session(path: Path, bundle: Bundle, mode: str):
    """An onnxruntime session of ``path``, after checking (its ``.json``) that it is this
    bundle's pair, fused in ``mode``.

    Raises:
        UserError: no record beside the graph, or a graph of another run, pair or mode.
    """
    import json

    import onnxruntime as ort

    path = Path(path)
    record_file = path.with_name(path.name + ".json")
    try:
        record = json.loads(record_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        msg = f"{record_file}: unreadable ({err}); export with crossprobe export onnx"
        raise UserError(msg) from None
    want = {"pair": list(bundle.pair), "config_hash": bundle.card.get("config_hash"), "mode": mode}
    got = {**{k: record.get(k) for k in ("pair", "config_hash")},
           "mode": record.get("fusion", {}).get("mode")}  # fmt: skip
    if got != want:
        raise UserError(f"{path}: exported from another bundle or mode ({got}, expected {want})")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels (the mask minus its 4-neighbour erosion)."""
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def write_overlay(path: Path, frames: np.ndarray, masks: list[np.ndarray], fps: int = 10) -> None:
    """An MP4 of the frames with each mask's outline in yellow (even width/height for yuv420p)."""
    import av

    h, w = frames.shape[1:]
    he, we = h + h % 2, w + w % 2
    with av.open(str(path), "w") as out:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = we, he, "yuv420p"
        for frame, mask in zip(frames, masks, strict=True):
            rgb = np.zeros((he, we, 3), np.uint8)
            rgb[:h, :w] = frame[..., None]
            rgb[:h, :w][_outline(mask)] = (255, 220, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_nifti(path: Path, masks: np.ndarray, spacing_mm: tuple[float | None, float | None]):
    """(T, H, W) masks as a NIfTI volume in the orientation the ingest reader reads labels in."""
    import nibabel as nib

    affine = np.diag([spacing_mm[0] or 1.0, spacing_mm[1] or 1.0, 1.0, 1.0])
    vol = masks.astype(np.uint8).transpose(2, 1, 0).copy()
    nib.save(nib.Nifti1Image(vol, affine), str(path))


def segment_sweep(
    seg: FusedSegmenter,
    sweep: Sweep,
    out: Path,
    batch_size: int = 8,
    say: Callable[[str], None] = print,
) -> Path:
    """Segment one sweep into ``out/<sweep name>/``; returns that folder."""
    from common.data.images import save_png

    folder = Path(out) / sweep.name
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    masks, rows, t0 = [], [], time.perf_counter()
    n = len(sweep.frames)
    for res in seg.frames(sweep, batch_size):
        png = folder / "masks" / f"{res.row['frame']:05d}.png"
        save_png((res.mask * 255).astype(np.uint8), png)
        res.row["flag"] = int(float(res.row["branch_agreement"]) < AGREEMENT_FLAG)
        masks.append(res.mask)
        rows.append(res.row)
        done = len(rows)
        if done == n or done % max(batch_size, 1) == 0:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            say(f"[segment] {sweep.name}: {done}/{n} frames, {rate:.1f} frames/s, "
                f"ETA {(n - done) / max(rate, 1e-9):.0f} s")  # fmt: skip
    with (folder / "frames.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    write_overlay(folder / "overlay.mp4", sweep.frames, masks)
    if sweep.kind == "dicom":
        write_nifti(folder / "mask.nii.gz", np.stack(masks), sweep.spacing_mm)
    flagged = sum(int(r["flag"]) for r in rows)
    say(f"[segment] {sweep.name}: {folder} ({flagged} of {n} frames flagged: branches disagree)")
    return folder
