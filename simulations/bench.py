"""`crossprobe bench`: training images/s per stage and fused-inference frames/s, on random tensors.

Numbers are medians over timed iterations after warm-up; compare ratios from one run (these machines
are noisy): fused (two branches + fusion) vs single-model inference.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch
import typer

from common.config import load_experiment
from common.engine import autocast, bf16_supported, make_optimizer
from common.fusion import fuse
from common.losses import DiceBCELoss, MTNXentLoss
from common.models import ContrastiveModel, SimMIMModel, build_transunet
from common.stages import contrastive_step, segmentation_step, simmim_step


def _time(fn, warmup: int, iters: int, device: torch.device) -> float:
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


def run_bench(
    config: str,
    device: str = "cpu",
    batch: int = 8,
    iters: int = 5,
    warmup: int = 2,
    bf16: bool = False,
    channels_last: bool = False,
    stages: tuple[str, ...] = ("simmim", "contrastive", "finetune", "inference"),
) -> dict:
    """Measure each stage; returns a dict of figures (also what the CLI prints)."""
    cfg = load_experiment(config)
    dev = torch.device(device)
    s = cfg.model.img_size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, s, s, generator=g).to(dev)
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

    def prep(m: torch.nn.Module) -> torch.nn.Module:
        m.to(dev)
        return m.to(memory_format=torch.channels_last) if channels_last else m

    def train_rate(model, step, batch_dict, images: int) -> float:
        opt = make_optimizer(
            model.parameters(), cfg.finetune.optim.model_copy(update={"optimizer": "adamw"})
        )

        def one():
            with autocast(dev, bf16):
                loss = step(batch_dict)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return images / _time(one, warmup, iters, dev)

    if "simmim" in stages:
        m = prep(SimMIMModel(cfg.model)).train()
        out["simmim_train_img_per_s"] = train_rate(
            m, simmim_step(m, cfg.simmim, s, g), {"image": x}, batch
        )
        del m
    if "contrastive" in stages:
        m = prep(ContrastiveModel(cfg.model)).train()
        b = {
            "view1": x,
            "view2": x.flip(-1),
            "video": torch.arange(batch, device=dev) % 2,
            "frame": torch.arange(batch, device=dev),
        }
        # images/s counts originals (each is seen as two views)
        out["contrastive_train_img_per_s"] = train_rate(
            m, contrastive_step(m, MTNXentLoss(0.5, 15)), b, batch
        )
        del m
    if "finetune" in stages:
        m = prep(build_transunet(cfg.model)).train()
        b = {"image": x, "mask": (x[:, :1] > 0.5).float()}
        out["finetune_train_img_per_s"] = train_rate(
            m, segmentation_step(m, DiceBCELoss()), b, batch
        )
        del m
    if "inference" in stages:
        m_g = prep(build_transunet(cfg.model)).eval()
        m_c = prep(build_transunet(cfg.model)).eval()

        @torch.inference_mode()
        def single():
            with autocast(dev, bf16):
                return torch.sigmoid(m_g(x).float()) >= 0.5

        @torch.inference_mode()
        def fused():
            with autocast(dev, bf16):
                p_g = torch.sigmoid(m_g(x).float())
                p_c = torch.sigmoid(m_c(x).float())
            return fuse(p_g, p_c, "entropy")[0] >= 0.5

        t_single = _time(single, warmup, iters, dev)
        t_fused = _time(fused, warmup, iters, dev)
        out["single_infer_frames_per_s"] = batch / t_single
        out["fused_infer_frames_per_s"] = batch / t_fused
        out["fused_over_single_time"] = t_fused / t_single
    return out


def bench_command(
    config: Path = typer.Option(Path("configs/demo.yaml"), help="Experiment YAML (model size)."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N"),
    batch: int = typer.Option(8, help="Images per step."),
    iters: int = typer.Option(5, help="Timed iterations (median reported)."),
    warmup: int = typer.Option(2, help="Untimed warm-up iterations."),
    bf16: bool = typer.Option(False, help="bf16 autocast (only where the device supports it)."),
    channels_last: bool = typer.Option(False, help="channels-last memory format."),
    threads: int = typer.Option(0, help="torch threads (0 = torch's default)."),
    stages: str = typer.Option(
        "simmim,contrastive,finetune,inference", help="Comma-separated stages."
    ),
    json_out: Path | None = typer.Option(
        None, "--json", help="Also write the figures as JSON here."
    ),
) -> None:
    """Print training images/s per stage and fused-inference frames/s for CONFIG on DEVICE."""
    if threads:
        torch.set_num_threads(threads)
    res = run_bench(
        str(config), device, batch, iters, warmup, bf16, channels_last, tuple(stages.split(","))
    )
    for k, v in res.items():
        typer.echo(f"{k:32s} {v:.3f}" if isinstance(v, float) else f"{k:32s} {v}")
    if json_out:
        json_out.write_text(json.dumps(res, indent=2))


def run_pipeline(config: str, run_dir: Path) -> dict:
    """The federated study's stages called directly, in process, one after the other — no Flower.

    The reference for the Flower overhead: same config, same stage functions, same data; compare its
    wall time with ``crossprobe simulate``'s. One source + one target (the paper's federation).
    """
    from common import stages
    from common.data.manifest import load_site
    from common.fl import protocol as p
    from simulations.sites import ensure_site

    cfg = load_experiment(config)
    t0 = time.perf_counter()
    data = {
        s.role: load_site(ensure_site(s, cfg.model.img_size, run_dir / "data")) for s in cfg.sites
    }
    src, tgt = data["source"], data["target"]
    out = run_dir / "inprocess"
    times: dict[str, float] = {"data": time.perf_counter() - t0}

    def timed(key: str, fn):
        t = time.perf_counter()
        res = fn()
        times[key] = time.perf_counter() - t
        return res

    branches = [p.SIMMIM, p.CONTRASTIVE] + ([p.SIMCLR] if cfg.contrastive.simclr_arm else [])
    encoders = {
        b: timed(
            f"pretrain:{b}", lambda b=b: stages.pretrain(cfg, b, tgt, out / f"pretrain-{b}")
        ).state
        for b in branches
    }
    models = {}
    for b, enc in encoders.items():
        arm = p.ARM_OF_BRANCH[b]
        models[arm] = timed(
            f"finetune:{arm}",
            lambda arm=arm, enc=enc: stages.finetune(cfg, src, out / f"ft-{arm}", enc, arm),
        ).state
    models[p.LOWER] = timed(
        "finetune:lower", lambda: stages.finetune(cfg, src, out / "ft-lower", None, p.LOWER)
    ).state
    models[p.UPPER] = timed(
        "finetune:upper", lambda: stages.finetune(cfg, tgt, out / "ft-upper", None, p.UPPER)
    ).state
    results = {
        site.name: timed(
            f"evaluate:{site.name}",
            lambda site=site: stages.evaluate(
                cfg, site, out / f"eval-{site.name}", models, [p.FUSION_PAIR]
            ),
        ).metrics
        for site in (tgt, src)
    }
    times["total"] = time.perf_counter() - t0
    summary = {"config": config, "seconds": times, "metrics": results}
    (run_dir / "inprocess.json").write_text(json.dumps(summary, indent=2))
    return summary


def pipeline_command(
    config: Path = typer.Option(Path("configs/demo.yaml"), help="Experiment YAML."),
    run_dir: Path = typer.Option(Path("runs/inprocess"), help="Where data and outputs go."),
) -> None:
    """Run the study's stages in process without Flower (the reference for Flower's overhead)."""
    res = run_pipeline(str(config), run_dir)
    for k, v in res["seconds"].items():
        typer.echo(f"{k:28s} {v:8.1f} s")
