"""Several processes training one model inside a site (``runtime.world_size``), on PyTorch's own
distributed engine: NCCL between GPUs, gloo between CPU processes.

A stage function that is asked for ``world_size`` > 1 calls :func:`spawn` with itself; each rank
runs the same stage with its share of every batch, and rank 0's result is the stage's. Inside a
rank nothing else changes: the ClientApp handlers, the wire and the outputs stay as they were.

What makes N processes compute what one process computes on the same global batch:
- :class:`ShardedBatches`: every rank draws the one-process batch sequence (same seed) and takes
  its contiguous share of each batch, so the ranks' shares, in rank order, are the global batch;
- :func:`wrap` (DistributedDataParallel): gradients averaged over ranks, i.e. the gradient of the
  mean of the ranks' losses, which is the one-process loss for a mean-reduced loss;
- :func:`gather_with_grad`: MT-NXent's embeddings, video ids and frame indices gathered from every
  rank, so negatives and the temporal mask span the global batch;
- :class:`SyncBatchNorm2d`: the decoder's BatchNorm normalises with the global batch's statistics
  (PyTorch's own SyncBatchNorm runs on GPUs only; this one runs on gloo too, so the CPU tests
  check the code path a GPU runs).
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.multiprocessing.spawn import ProcessException


class DistributedStageError(RuntimeError):
    """A rank of a multi-process stage failed; the message names the rank and its error."""


@dataclass(frozen=True)
class Rank:
    """This process's place in its site's training group (rank 0 of 1 outside one)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes the stage's files and returns its weights."""
        return self.rank == 0


def current() -> Rank:
    if dist.is_available() and dist.is_initialized():
        return Rank(dist.get_rank(), dist.get_world_size())
    return Rank()


def should_spawn(world_size: int) -> bool:
    """A stage asked for several processes that is not already one of them."""
    return world_size > 1 and current().world == 1


def rank_device(device: str) -> torch.device:
    """Rank r trains on ``cuda:r`` when the config says ``cuda`` (one GPU per rank)."""
    dev = torch.device(device)
    r = current()
    if dev.type == "cuda" and dev.index is None and r.world > 1:
        return torch.device("cuda", r.rank)
    return dev


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def backend_for(device: str) -> str:
    """torch.distributed's backend for a device: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _rank_main(
    rank: int,
    world: int,
    port: int,
    device: str,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple,
    result: str,
) -> None:
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # all ranks of a site share one host
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        out = fn(*args)
        if rank == 0:
            torch.save(out, result)
        dist.barrier()
    except BaseException:
        # the parent reads only the exit status and the pickled exception; keep the whole trace
        Path(f"{result}.rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    args: Sequence[Any],
    *,
    world_size: int,
    device: str,
    workdir: Path,
    what: str,
    timeout_s: float = 1800.0,
) -> Any:
    """Run ``fn(*args)`` in ``world_size`` processes joined in one process group; return rank 0's
    result. A rank that fails ends them all (no rank waits on it past ``timeout_s``).

    Raises:
        DistributedStageError: naming ``what``, the rank and the first line of its error.
    """
    if torch.device(device).type == "cuda" and torch.cuda.device_count() < world_size:
        raise DistributedStageError(
            f"{what}: runtime.world_size {world_size} needs {world_size} GPUs, "
            f"{torch.cuda.device_count()} visible"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    result = workdir / f".rank0-result-{os.getpid()}.pt"
    print(f"[{what}] {world_size} processes ({backend_for(device)})", flush=True)
    port = _free_port()
    try:
        mp.start_processes(
            _rank_main,
            args=(world_size, port, device, timeout_s, fn, tuple(args), str(result)),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
    except ProcessException as err:
        rank, said = _first_cause(result, err, world_size)
        raise DistributedStageError(f"{what}: rank {rank} of {world_size} failed: {said}") from None
    finally:
        for leftover in workdir.glob(f"{result.name}.rank*.err"):
            leftover.unlink()
    try:
        return torch.load(result, weights_only=False)
    finally:
        result.unlink(missing_ok=True)


def _first_cause(result: Path, err: ProcessException, world: int) -> tuple[Any, str]:
    """(rank, last line of its error) of the rank that failed first: a rank whose peer died
    fails too, in a collective, and may be the one the parent saw exit first."""
    said = {}
    for r in range(world):
        trace = Path(f"{result}.rank{r}.err")
        if trace.exists():
            lines = trace.read_text().strip().splitlines()
            said[r] = lines[-1] if lines else "?"
    own = {r: s for r, s in said.items() if not _lost_a_peer(s)}
    for errors in (own, said):
        if errors:
            r = min(errors)
            return r, errors[r]
    return getattr(err, "error_index", "?"), str(err).strip().splitlines()[-1]


def _lost_a_peer(line: str) -> bool:
    """An error a collective raises when another rank went away (gloo, NCCL)."""
    return any(s in line for s in ("gloo", "NCCL", "Connection closed by peer", "ProcessGroup"))


# ------------------------------------------------------------------------------ batches


class ShardedBatches:
    """Rank r's contiguous share of every batch of ``batches`` (the one-process batch sampler):
    the shares of ranks 0..N-1, concatenated, are the one-process batch.

    Raises:
        ValueError: a batch does not split into equal shares.
    """

    def __init__(self, batches, rank: Rank):
        self.batches, self.rank = batches, rank

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        r, n = self.rank.rank, self.rank.world
        for batch in self.batches:
            if len(batch) % n:
                raise ValueError(
                    f"a batch of {len(batch)} frames does not split evenly between "
                    f"runtime.world_size {n} processes: choose a batch_size divisible by it"
                )
            size = len(batch) // n
            yield list(batch[r * size : (r + 1) * size])

    def __len__(self) -> int:
        return len(self.batches)


# ------------------------------------------------------------------------------ models


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` inside DistributedDataParallel in a multi-process stage; ``model`` otherwise.

    Buffers are synced once, at the start, not at every forward pass: with :class:`SyncBatchNorm2d`
    every rank computes the same running statistics, and a forward pass without collectives lets
    validation run any number of batches on each rank.
    """
    if current().world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of each rank's input is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class _GatherWithGrad(torch.autograd.Function):
    """Every rank's ``x`` concatenated in rank order; gradients flow back to each rank's share
    (summed over the ranks, which under DDP's averaging gives the one-process gradient when every
    rank computes the same loss of the global batch)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r = current()
        parts = [torch.empty_like(x) for _ in range(r.world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size = r.rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the ranks, differentiable (identity in one process)."""
    return _AllReduceSum.apply(x) if current().world > 1 else x


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, differentiable (identity in one process).
    All ranks must hold the same number of rows."""
    return _GatherWithGrad.apply(x) if current().world > 1 else x


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, no gradient (ids, frame indices)."""
    if current().world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(current().world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def global_mean(x: float, n: int = 1) -> float:
    """The mean over ranks of a per-rank value weighted by ``n`` (itself in one process)."""
    if current().world == 1:
        return x
    t = torch.tensor([x * n, float(n)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / t[1].clamp_min(1.0))


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (all ranks), with
    gradients through them; in one process, or in eval mode, exactly BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and current().world > 1):
            return super().forward(x)
        c = x.shape[1]
        local = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        xf = x.float()
        sums = all_reduce_sum(
            torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), local.float()])
        )
        n = sums[-1]
        mean = sums[:c] / n
        var = (sums[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                tracked = float(self.num_batches_tracked) + 1
                m = self.momentum if self.momentum is not None else 1.0 / tracked
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
                self.num_batches_tracked.add_(1)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm2d of ``model`` as a :class:`SyncBatchNorm2d` (same parameters, buffers and
    state-dict keys), in place; a no-op in one process."""
    if current().world == 1:
        return model
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = SyncBatchNorm2d  # same state; only forward differs
    return model
