"""`crossprobe bench`: training images/s per stage and fused-inference frames/s, on random tensors.

Numbers are medians over timed iterations after warm-up; compare ratios from one run (these machines
are noisy): fused (two branches + fusion) vs single-model inference. torch is imported inside the
functions so ``crossprobe bench --help`` stays instant.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

STAGES = ("simmim", "contrastive", "finetune", "inference", "fused")


def median_seconds(fn, warmup: int, iters: int, device) -> float:
    """Median seconds of ``fn()`` over ``iters`` calls after ``warmup`` untimed ones."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@dataclass
class _Bench:
    """One benchmark's setting: the config, a random batch on the device, the timing budget."""

    cfg: Any
    device: Any
    x: Any  # (batch, 3, S, S) random images
    gen: Any  # the generator that drew them (SimMIM's masks continue from it)
    bf16: bool
    channels_last: bool
    warmup: int
    iters: int
    fused_batches: tuple[int, ...] = (1, 32)

    def prep(self, m):
        import torch

        m.to(self.device)
        return m.to(memory_format=torch.channels_last) if self.channels_last else m

    def prep_input(self, x):
        import torch

        x = x.to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def train_rate(self, model, step, batch: dict, images: int) -> float:
        """Images per second of forward + backward + optimiser step."""
        from common.engine import autocast, make_optimizer

        optim = self.cfg.finetune.optim.model_copy(update={"optimizer": "adamw"})
        opt = make_optimizer(model.parameters(), optim)

        def one():
            with autocast(self.device, self.bf16):
                loss = step(batch)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return images / median_seconds(one, self.warmup, self.iters, self.device)


def _simmim_rate(b: _Bench) -> dict[str, float]:
    from common.models import SimMIMModel
    from common.stages import simmim_step

    m = b.prep(SimMIMModel(b.cfg.model)).train()
    step = simmim_step(m, b.cfg.simmim, b.cfg.model.img_size, b.gen)
    return {"simmim_train_img_per_s": b.train_rate(m, step, {"image": b.x}, len(b.x))}


def _contrastive_rate(b: _Bench) -> dict[str, float]:
    import torch

    from common.losses import MTNXentLoss
    from common.models import ContrastiveModel
    from common.stages import contrastive_step

    m = b.prep(ContrastiveModel(b.cfg.model)).train()
    n = len(b.x)
    batch = {
        "view1": b.x,
        "view2": b.x.flip(-1),
        "video": torch.arange(n, device=b.device) % 2,
        "frame": torch.arange(n, device=b.device),
    }
    # images/s counts originals (each is seen as two views)
    step = contrastive_step(m, MTNXentLoss(0.5, 15))
    return {"contrastive_train_img_per_s": b.train_rate(m, step, batch, n)}


def _finetune_rate(b: _Bench) -> dict[str, float]:
    from common.losses import DiceBCELoss
    from common.models import build_transunet
    from common.stages import segmentation_step

    m = b.prep(build_transunet(b.cfg.model)).train()
    batch = {"image": b.x, "mask": (b.x[:, :1] > 0.5).float()}
    step = segmentation_step(m, DiceBCELoss())
    return {"finetune_train_img_per_s": b.train_rate(m, step, batch, len(b.x))}


def _inference_rates(b: _Bench) -> dict[str, float]:
    import torch

    from common.engine import autocast
    from common.fusion import fuse
    from common.models import build_transunet

    m_g = b.prep(build_transunet(b.cfg.model)).eval()
    m_c = b.prep(build_transunet(b.cfg.model)).eval()

    @torch.inference_mode()
    def single():
        with autocast(b.device, b.bf16):
            return torch.sigmoid(m_g(b.x).float()) >= 0.5

    @torch.inference_mode()
    def fused():
        with autocast(b.device, b.bf16):
            p_g = torch.sigmoid(m_g(b.x).float())
            p_c = torch.sigmoid(m_c(b.x).float())
        return fuse(p_g, p_c, "entropy")[0] >= 0.5

    t_single = median_seconds(single, b.warmup, b.iters, b.device)
    t_fused = median_seconds(fused, b.warmup, b.iters, b.device)
    return {
        "single_infer_frames_per_s": len(b.x) / t_single,
        "fused_infer_frames_per_s": len(b.x) / t_fused,
        "fused_over_single_time": t_fused / t_single,
    }


FUSED_BATCHES = (1, 32)  # where overhead dominates, and where arithmetic does


def _fused_rates(b: _Bench) -> dict[str, float]:
    """Frames/s at batch 1 and 32 of one model and of the fused pair four ways: sequential torch,
    the branches in two threads, ONNX Runtime (the exported graph), ONNX Runtime running the
    graph's two branches in parallel; and each one's time over one model's."""
    import tempfile

    import torch

    from common.engine import autocast
    from common.fusion import fuse
    from common.models import build_transunet
    from common.onnx_export import FusedPair, export_onnx_module
    from common.pair import forward_all

    nets = {n: b.prep(build_transunet(b.cfg.model)).eval() for n in ("a", "b")}
    s = b.cfg.model.img_size

    @torch.inference_mode()
    def single(x):
        with autocast(b.device, b.bf16):
            return torch.sigmoid(nets["a"](x).float()) >= 0.5

    @torch.inference_mode()
    def fused(x, parallel: bool):
        with autocast(b.device, b.bf16):
            logits = forward_all(nets, x, parallel)
        p = {k: torch.sigmoid(v.float()) for k, v in logits.items()}
        return fuse(p["a"], p["b"], "entropy")[0] >= 0.5

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        if b.device.type == "cpu":  # the graph runs on onnxruntime's CPU provider
            pair = FusedPair(nets["a"], nets["b"], "entropy", "image", 1e-6).eval()
            sessions = _onnx_sessions(lambda path: export_onnx_module(pair, s, path), Path(tmp))
        for n in b.fused_batches:
            x = torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(n))
            feed = {"images": x.numpy()}  # onnxruntime: contiguous float32 on the host
            x = b.prep_input(x)
            timed = {
                "single": lambda x=x: single(x),
                "fused_sequential": lambda x=x: fused(x, False),
                "fused_threads": lambda x=x: fused(x, True),
                **{f"fused_{k}": (lambda sess=sess, feed=feed: sess.run(None, feed))
                   for k, sess in sessions.items()},
            }  # fmt: skip
            seconds = {
                k: median_seconds(fn, b.warmup, b.iters, b.device) for k, fn in timed.items()
            }
            for k, t in seconds.items():
                out[f"b{n}_{k}_frames_per_s"] = n / t
                if k != "single":
                    out[f"b{n}_{k}_over_single_time"] = t / seconds["single"]
    return out


def _onnx_sessions(export, folder: Path) -> dict:
    """onnxruntime sessions of the graph ``export(path)`` writes: operators one at a time
    (``onnxruntime``) and independent branches at once (``onnxruntime_parallel``); none without
    the onnx extra."""
    try:
        import onnxruntime as ort
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        return {}
    path = export(folder / "pair.onnx")
    out = {}
    for name, mode in (("onnxruntime", ort.ExecutionMode.ORT_SEQUENTIAL),
                       ("onnxruntime_parallel", ort.ExecutionMode.ORT_PARALLEL)):  # fmt: skip
        opts = ort.SessionOptions()
        opts.execution_mode = mode
        out[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return out


_MEASURE = {
    "simmim": _simmim_rate,
    "contrastive": _contrastive_rate,
    "finetune": _finetune_rate,
    "inference": _inference_rates,
    "fused": _fused_rates,
}


def run_bench(
    config: str,
    device: str = "cpu",
    batch: int = 8,
    iters: int = 5,
    warmup: int = 2,
    bf16: bool = False,
    channels_last: bool = False,
    stages: tuple[str, ...] = STAGES,
    fused_batches: tuple[int, ...] = FUSED_BATCHES,
) -> dict:
    """Measure each stage; returns a dict of figures (also what the CLI prints).

    Raises:
        typer.BadParameter: an unknown stage name.
    """
    import torch

    from common.config import load_experiment
    from common.engine import bf16_supported

    unknown = [s for s in stages if s not in _MEASURE]
    if unknown:
        raise typer.BadParameter(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    cfg = load_experiment(config)
    dev = torch.device(device)
    s = cfg.model.img_size
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, s, s, generator=gen).to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out: dict = {
        "config": config,
        "img_size": s,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "bf16": bool(bf16 and bf16_supported(str(dev))),
        "bf16_requested": bf16,
        "channels_last": channels_last,
    }
    bench = _Bench(cfg, dev, x, gen, bf16, channels_last, warmup, iters, fused_batches)
    for stage in stages:
        out.update(_MEASURE[stage](bench))
    return out


def bench_command(
    config: Path | None = typer.Option(
        None, help="Experiment YAML (model size); default configs/demo.yaml, paper for --suite gpu."
    ),
    device: str | None = typer.Option(
        None, help="cpu | cuda | cuda:N; default cpu, cuda for --suite gpu."
    ),
    batch: int = typer.Option(8, help="Images per step."),
    iters: int = typer.Option(5, help="Timed iterations (median reported)."),
    warmup: int = typer.Option(2, help="Untimed warm-up iterations."),
    bf16: bool = typer.Option(False, help="bf16 autocast (only where the device supports it)."),
    channels_last: bool = typer.Option(False, help="channels-last memory format."),
    threads: int = typer.Option(0, help="torch threads (0 = torch's default)."),
    stages: str = typer.Option(",".join(STAGES), help="Comma-separated stages."),
    fused_batches: str = typer.Option(
        ",".join(map(str, FUSED_BATCHES)), help="Batch sizes of the fused stage (comma-separated)."
    ),
    json_out: Path | None = typer.Option(
        None, "--json", help="Also write the figures as JSON here."
    ),
    suite: str = typer.Option(
        "", help="'gpu': the prepared GPU benchmark (simulations/bench_gpu.py) on one device."
    ),
    out: Path = typer.Option(
        Path("bench-gpu.json"), help="--suite gpu: its JSON, kept up to date."
    ),
    budget_s: float = typer.Option(420.0, help="--suite gpu: seconds it may take in all."),
    compile_stages: bool = typer.Option(
        True,
        "--compile/--no-compile",
        help="--suite gpu: also time each stage under torch.compile.",
    ),  # fmt: skip
) -> None:
    """Print training images/s per stage and fused-inference frames/s for CONFIG on DEVICE."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if suite:
        if suite != "gpu":
            raise typer.BadParameter(f"unknown suite {suite!r}; known: gpu", param_hint="--suite")
        from simulations.bench_gpu import STAGES as STAGES_GPU
        from simulations.bench_gpu import run_gpu_suite

        try:
            run_gpu_suite(str(config or "configs/paper.yaml"), device or "cuda", out, budget_s,
                          iters, warmup, STAGES_GPU if compile_stages else ())  # fmt: skip
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--device") from None
        typer.echo(f"wrote {out}")
        return
    config, device = config or Path("configs/demo.yaml"), device or "cpu"
    res = run_bench(
        str(config), device, batch, iters, warmup, bf16, channels_last, tuple(stages.split(",")),
        tuple(int(n) for n in fused_batches.split(",")),
    )  # fmt: skip
    for k, v in res.items():
        typer.echo(f"{k:48s} {v:.3f}" if isinstance(v, float) else f"{k:48s} {v}")
    if json_out:
        json_out.write_text(json.dumps(res, indent=2))
