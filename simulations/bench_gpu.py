"""`crossprobe bench --suite gpu --out FILE`: what only a GPU can tell, in one prepared run.

On one CUDA device, for the paper config (R50-ViT-B/16 at 224 px) in bf16, within a time budget
(default 7 minutes, so it fits a short loan of a machine):
- training images/s of each stage (SimMIM, MT-NXent, fine-tuning) at the paper's per-GPU batch,
  eager and under ``torch.compile`` (with its compile time), and each one's peak GPU memory;
- the largest MT-NXent batch (originals, two views each) that fits on the device;
- fused-pair inference frames/s at batch 1 and 64, beside one model's;
- where two or more GPUs are visible, a 2-rank NCCL check: MT-NXent over two ranks equals one
  process on the same global batch, and the all-reduce bandwidth for a gradient of the model's size.

Every figure is written to FILE as soon as it is measured, so a run stopped by its time limit keeps
what it had; an item that would not fit the remaining budget is recorded as skipped. The same code
runs on a CPU with a small config (``--device cpu --config configs/tiny.yaml``), which is how the
tests check it before a GPU is at hand.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulations.bench import median_seconds

# the paper's global batches and the devices it spread them over (the paper gives no device count
# for SimMIM; taken as the contrastive branch's 8)
PAPER_DEVICES = {"simmim": 8, "contrastive": 8, "finetune": 4}
INFER_BATCHES = (1, 64)
STAGES = tuple(PAPER_DEVICES)


def per_device_batch(cfg, stage: str) -> int:
    """The paper's per-GPU batch of ``stage`` for ``cfg``'s global batch (at least 2)."""
    return max(2, getattr(cfg, stage).optim.batch_size // PAPER_DEVICES[stage])


def largest_batch(fits: Callable[[int], bool], start: int, limit: int) -> int | None:
    """The largest batch ``start * 2**k`` <= ``limit`` for which ``fits`` holds, doubling until it
    does not (None when ``start`` itself does not fit)."""
    best, n = None, start
    while n <= limit and fits(n):
        best, n = n, n * 2
    return best


class _Suite:
    """The run's state: the config, the device, the budget and the figures written so far."""

    def __init__(self, cfg, device, out: Path, budget_s: float, iters: int, warmup: int, log):
        self.cfg, self.device, self.out, self.log = cfg, device, out, log
        self.iters, self.warmup = iters, warmup
        self.t0, self.budget_s = time.monotonic(), budget_s
        self.figures: dict[str, Any] = {}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def record(self, **figures) -> None:
        self.figures.update(figures)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.figures, indent=2))

    def item(self, name: str, needs_s: float, measure: Callable[[], dict[str, Any]]) -> None:
        """Measure ``name`` if about ``needs_s`` seconds are left; record it, or why not."""
        if self.left() < needs_s:
            self.record(
                **{f"{name}_skipped": f"budget: {self.left():.0f} s left, ~{needs_s:.0f} s needed"}
            )
            self.log(f"[bench gpu] {name}: skipped ({self.left():.0f} s left)")
            return
        t = time.monotonic()
        try:
            figures = measure()
        except Exception as err:  # one failed item must not cost the others
            figures = {f"{name}_error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        self.record(**figures)
        took = time.monotonic() - t
        self.log(f"[bench gpu] {name}: {took:.0f} s; {self.left():.0f} s of the budget left; "
                 + ", ".join(f"{k} {_fmt(v)}" for k, v in figures.items()))  # fmt: skip

    # ------------------------------------------------------------------ training
    def _reset_peak(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak_gb(self) -> float | None:
        import torch

        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def train(self, stage: str, compiled: bool, batch: int | None = None) -> dict[str, Any]:
        """Images/s of one optimiser step of ``stage`` at ``batch`` (default: the paper's per-GPU
        batch) in bf16, and the step's peak memory."""
        import torch

        from common.engine import autocast, make_optimizer

        n = batch or per_device_batch(self.cfg, stage)
        model, step_of, batch_of = _stage(self.cfg, stage)
        model.to(self.device).to(memory_format=torch.channels_last).train()
        net = torch.compile(model) if compiled else model
        step, data = step_of(net), batch_of(n, self.cfg.model.img_size, self.device)
        opt = make_optimizer(model.parameters(), getattr(self.cfg, stage).optim)

        def one():
            with autocast(self.device, True):
                loss = step(data)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        self._reset_peak()
        t = time.perf_counter()
        one()  # the first step compiles, when compiled
        first = time.perf_counter() - t
        seconds = median_seconds(one, self.warmup, self.iters, self.device)
        key = f"{stage}_{'compiled' if compiled else 'eager'}"
        figures = {f"{key}_batch": n, f"{key}_img_per_s": n / seconds}
        if compiled:
            figures[f"{key}_compile_s"] = first
        peak = self._peak_gb()
        if peak is not None:
            figures[f"{key}_peak_gpu_gb"] = peak
        return figures

    def largest_contrastive_batch(self) -> dict[str, Any]:
        """Doubling from the paper's per-GPU batch until a step runs out of device memory."""
        import torch

        start = per_device_batch(self.cfg, "contrastive")
        # a CPU has no memory to run out of here: check the search with one doubling
        limit = start * (64 if self.device.type == "cuda" else 2)
        deadline = time.monotonic() + min(90.0, max(self.left() - 120, 0))  # leave compile time

        def fits(n: int) -> bool:
            if time.monotonic() > deadline:
                return False
            try:
                self.train("contrastive", compiled=False, batch=n)
                return True
            except torch.OutOfMemoryError:
                self._reset_peak()
                return False

        return {"contrastive_largest_batch": largest_batch(fits, start, limit),
                "contrastive_largest_batch_searched_to": limit}  # fmt: skip

    # ------------------------------------------------------------------ inference
    def fused_inference(self) -> dict[str, Any]:
        """Frames/s of one model and of the fused pair (both branches, entropy fusion), bf16."""
        import torch

        from common.engine import autocast
        from common.fusion import fuse
        from common.models import build_transunet

        nets = [build_transunet(self.cfg.model).to(self.device).eval() for _ in range(2)]
        for net in nets:
            net.to(memory_format=torch.channels_last)
        s = self.cfg.model.img_size
        figures: dict[str, Any] = {}
        for n in INFER_BATCHES:
            x = torch.rand(n, 3, s, s, device=self.device).contiguous(
                memory_format=torch.channels_last
            )

            @torch.inference_mode()
            def single(x=x):
                with autocast(self.device, True):
                    return torch.sigmoid(nets[0](x).float()) >= 0.5

            @torch.inference_mode()
            def fused(x=x):
                with autocast(self.device, True):
                    p = [torch.sigmoid(net(x).float()) for net in nets]
                return fuse(p[0], p[1], "entropy")[0] >= 0.5

            t1 = median_seconds(single, self.warmup, self.iters, self.device)
            t2 = median_seconds(fused, self.warmup, self.iters, self.device)
            figures.update({f"b{n}_single_frames_per_s": n / t1, f"b{n}_fused_frames_per_s": n / t2,
                            f"b{n}_fused_over_single_time": t2 / t1})  # fmt: skip
        return figures

    # ------------------------------------------------------------------ two ranks
    def nccl_check(self) -> dict[str, Any]:
        """MT-NXent over two ranks against one process, and all-reduce bandwidth (two GPUs)."""
        import torch

        from common import distributed

        if self.device.type != "cuda" or torch.cuda.device_count() < 2:
            return {"nccl_skipped": f"{torch.cuda.device_count()} GPU(s) visible; needs 2"}
        params = sum(p.numel() for p in _stage(self.cfg, "finetune")[0].parameters())
        return distributed.spawn(
            _two_rank_check,
            (params,),
            world_size=2,
            device="cuda",
            workdir=self.out.parent,
            what="nccl check",
            timeout_s=120,
        )


def _stage(cfg, stage: str):
    """(model, step builder, random batch builder) of a training stage."""
    import torch

    from common.losses import DiceBCELoss, MTNXentLoss
    from common.models import ContrastiveModel, SimMIMModel, build_transunet
    from common.stages import contrastive_step, segmentation_step, simmim_step

    def images(n, s, dev):
        return torch.rand(n, 3, s, s, device=dev).contiguous(memory_format=torch.channels_last)

    if stage == "simmim":
        masks = torch.Generator().manual_seed(0)
        return (SimMIMModel(cfg.model),
                lambda net: simmim_step(net, cfg.simmim, cfg.model.img_size, masks),
                lambda n, s, dev: {"image": images(n, s, dev)})  # fmt: skip
    if stage == "contrastive":
        loss = MTNXentLoss(cfg.contrastive.temperature, cfg.contrastive.min_frame_gap)
        return (ContrastiveModel(cfg.model), lambda net: contrastive_step(net, loss),
                lambda n, s, dev: {"view1": images(n, s, dev), "view2": images(n, s, dev),
                                   "video": torch.arange(n, device=dev) // 4,
                                   "frame": torch.arange(n, device=dev) % 4 * 10})  # fmt: skip

    def labeled(n, s, dev):
        return {"image": images(n, s, dev), "mask": (torch.rand(n, 1, s, s, device=dev) > 0.9)}

    return build_transunet(cfg.model), lambda net: segmentation_step(net, DiceBCELoss()), labeled


def _two_rank_check(params: int) -> dict[str, Any]:
    """In each of two ranks: the gathered MT-NXent of a global batch against rank 0's one-process
    value, and the all-reduce bandwidth of a ``params``-float32 buffer (NCCL on GPUs; gloo on
    CPUs, which is how the tests run it)."""
    import torch
    import torch.distributed as dist

    from common import distributed
    from common.losses import MTNXentLoss

    r = distributed.current()
    dev = torch.device("cuda", r.rank) if torch.cuda.is_available() else torch.device("cpu")
    g = torch.Generator(device=dev).manual_seed(0)
    z = torch.randn(2, 64, 128, device=dev, generator=g, dtype=torch.float64)  # both views, global
    video = torch.arange(64, device=dev) // 4
    frame = torch.arange(64, device=dev) % 4 * 5
    loss_fn = MTNXentLoss(0.5, 15)
    share = slice(r.rank * 32, (r.rank + 1) * 32)
    z_i, z_j = (distributed.gather_with_grad(z[v, share]) for v in (0, 1))
    gathered = loss_fn(z_i, z_j, distributed.gather(video[share]), distributed.gather(frame[share]))
    alone = loss_fn(z[0], z[1], video, frame)
    buf = torch.ones(params, device=dev)
    dist.all_reduce(buf)  # warm-up: the first collective sets up the communicator
    seconds = median_seconds(lambda: dist.all_reduce(buf), 0, 5, dev)
    return {"nccl_mtnxent_abs_diff": abs(float(gathered) - float(alone)),
            "nccl_allreduce_gb": buf.numel() * 4 / 1e9,
            "nccl_allreduce_gb_per_s": buf.numel() * 4 / 1e9 / seconds}  # fmt: skip


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def run_gpu_suite(
    config: str = "configs/paper.yaml",
    device: str = "cuda",
    out: Path = Path("bench-gpu.json"),
    budget_s: float = 420.0,
    iters: int = 5,
    warmup: int = 2,
    compile_stages: tuple[str, ...] = STAGES,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Run every item of the suite that fits ``budget_s`` (``torch.compile`` for the stages in
    ``compile_stages``); returns (and writes to ``out``) the figures.

    Raises:
        ValueError: a CUDA device that is not there.
    """
    import torch

    from common.config import load_experiment
    from common.engine import bf16_supported

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible (use --device cpu)")
    cfg = load_experiment(config)
    suite = _Suite(cfg, dev, Path(out), budget_s, iters, warmup, log)
    suite.record(
        config=config, device=str(dev), torch=torch.__version__,
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        gpus=torch.cuda.device_count(), img_size=cfg.model.img_size,
        bf16=bf16_supported(str(dev)),
        per_device_batch={s: per_device_batch(cfg, s) for s in STAGES}, budget_s=budget_s,
    )  # fmt: skip
    for stage in STAGES:
        suite.item(f"{stage}_eager", 20, lambda stage=stage: suite.train(stage, compiled=False))
    suite.item("fused_inference", 20, suite.fused_inference)
    suite.item("nccl", 30, suite.nccl_check)
    suite.item("contrastive_largest_batch", 60, suite.largest_contrastive_batch)
    for stage in compile_stages:  # last: compiling the paper model takes minutes
        suite.item(f"{stage}_compiled", 90, lambda stage=stage: suite.train(stage, True))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    suite.record(peak_rss_gb=rss, seconds=time.monotonic() - suite.t0)
    return suite.figures
