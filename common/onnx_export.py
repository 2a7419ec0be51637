"""`crossprobe export onnx`: a bundle's fused pair as one ONNX graph — both branches and the
confidence-aware fusion inside it, a dynamic batch, the model-size square fixed (the position
embedding and the decoder grid are; frames are resized before the graph, as `segment` does).

The graph takes ``images`` (B, 3, S, S) float32 in [0, 1] and returns ``fused``, ``p_a`` and
``p_b`` (B, 1, S, S) probabilities: the fused map and each branch's, so the label-free confidence
of `crossprobe segment` can be computed from it too. torch's dynamo exporter writes the weights
to a ``.onnx.data`` file beside the graph; ship and hash both (``<file>.json`` lists them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.bundle import Bundle
from common.fusion import fuse

OPSET = 23  # native Attention and GroupNormalization (onnxruntime >= 1.22)
PROB_TOL = 1e-4  # |onnx - torch| of every probability where the fusion is well conditioned
MASK_AGREEMENT = 0.999  # share of pixels whose binary mask is the same
# The fusion divides by c_a + c_b + eps: where both branches are near their least confident pixel
# (confidences min-max normalised to ~0) it amplifies 1e-8 differences between runtimes; such
# pixels are counted, not held to PROB_TOL.
WELL_CONDITIONED = 1e-2


class FusedPair(torch.nn.Module):
    """Two branches and their fusion as one module (what the ONNX graph holds)."""

    def __init__(self, a: torch.nn.Module, b: torch.nn.Module, mode: str, normalize: str, eps):
        super().__init__()
        self.a, self.b = a, b
        self.mode, self.normalize, self.eps = mode, normalize, float(eps)

    def forward(self, images: torch.Tensor):
        p_a = torch.sigmoid(self.a(images).float())
        p_b = torch.sigmoid(self.b(images).float())
        fused, _ = fuse(p_a, p_b, self.mode, self.normalize, self.eps)
        return fused, p_a, p_b


def fused_pair(bundle: Bundle, mode: str | None = None) -> FusedPair:
    from common.stages import load_models

    cfg = bundle.cfg.model_copy(
        update={"runtime": bundle.cfg.runtime.model_copy(update={"channels_last": False})}
    )
    nets = load_models(cfg, bundle.states, torch.device("cpu"))
    f = bundle.card["fusion"]
    return FusedPair(nets[bundle.pair[0]], nets[bundle.pair[1]], mode or f["mode"],
                     f["normalize"], f["eps"]).eval()  # fmt: skip


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_onnx_module(model: FusedPair, size: int, out: Path) -> Path:
    """``model`` as an ONNX graph at ``out`` (weights in ``out``.data), a dynamic batch."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # batch 2: a batch-1 sample would specialise the batch dimension
    sample = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    torch.onnx.export(
        model, (sample,), str(out), dynamo=True, opset_version=OPSET, verbose=False,
        input_names=["images"], output_names=["fused", "p_a", "p_b"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
    )  # fmt: skip
    return out


def export_onnx(bundle: Bundle, out: Path, mode: str | None = None) -> dict:
    """Export the bundle's pair to ``out`` (+ ``out``.data); returns what ``out``.json records:
    the files and their SHA-256, the opset, the input size, the bundle's card essentials."""
    out = Path(out)
    model = fused_pair(bundle, mode)
    s = bundle.cfg.model.img_size
    export_onnx_module(model, s, out)
    files = [p for p in (out, out.with_name(out.name + ".data")) if p.is_file()]
    record = {
        "files": {p.name: _sha256(p) for p in files},
        "opset": OPSET,
        "input": {"name": "images", "shape": ["batch", 3, s, s], "range": [0.0, 1.0]},
        "outputs": ["fused", "p_a", "p_b"],
        "pair": list(bundle.pair),
        "fusion": {**bundle.card["fusion"], "mode": model.mode},
        "threshold": bundle.card["threshold"],
        "run_id": bundle.card.get("run_id"),
        "config_hash": bundle.card.get("config_hash"),
        "preprocessing": bundle.card.get("preprocessing"),
    }
    out.with_name(out.name + ".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


@dataclass
class Parity:
    frames: int
    max_branch_diff: float  # |onnx - torch| over both branches' probabilities
    max_fused_diff: float  # over the well-conditioned pixels
    ill_conditioned: float  # share of pixels where the fusion's denominator < WELL_CONDITIONED
    mask_agreement: float  # share of equal fused-mask pixels

    @property
    def ok(self) -> bool:
        return (
            self.max_branch_diff <= PROB_TOL
            and self.max_fused_diff <= PROB_TOL
            and self.mask_agreement >= MASK_AGREEMENT
        )


def check_parity(onnx_file: Path, model: FusedPair, images: torch.Tensor, threshold: float):
    """Run ``images`` through onnxruntime and torch; how far apart they are (``Parity``)."""
    import onnxruntime as ort

    from common.fusion import _minmax, confidence

    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": images.numpy().astype(np.float32)})
    with torch.inference_mode():
        ref = [t.numpy() for t in model(images)]
        c = sum(_minmax(confidence(torch.from_numpy(p), model.mode), model.normalize)
                for p in ref[1:])  # fmt: skip
    good = c.numpy() >= WELL_CONDITIONED
    fused_diff = np.abs(got[0] - ref[0])
    branch_diff = max(np.abs(g - r).max() for g, r in zip(got[1:], ref[1:], strict=True))
    return Parity(
        frames=len(images),
        max_branch_diff=float(branch_diff),
        max_fused_diff=float(fused_diff[good].max()) if good.any() else 0.0,
        ill_conditioned=float(1 - good.mean()),
        mask_agreement=float(((got[0] >= threshold) == (ref[0] >= threshold)).mean()),
    )
