"""Several models on one batch (the fused pair's two branches, an evaluation's arms): one after the
other, or each in its own thread.

On a CPU at small batches one forward pass does not keep the cores busy (much of its time is
per-operator overhead in Python and the dispatcher), so two branches run in two threads overlap;
the GIL is released inside every operator. The result is the same either way: each model's
arithmetic does not depend on what runs beside it. ``crossprobe bench --stages fused`` measures
both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="crossprobe-model")


def forward_all(
    nets: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    images: torch.Tensor,
    parallel: bool,
) -> dict[str, torch.Tensor]:
    """Each net's output on ``images``; in parallel threads when ``parallel`` and there are
    several (the caller's inference mode and autocast are carried into each thread)."""
    if not parallel or len(nets) < 2:
        return {name: net(images) for name, net in nets.items()}
    grad = torch.is_grad_enabled()
    inference = torch.is_inference_mode_enabled()
    dev = images.device.type
    cast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))

    def run(net):
        with (
            torch.inference_mode(inference),
            torch.set_grad_enabled(grad),
            torch.autocast(dev, cast[1], enabled=cast[0]),
        ):
            return net(images)

    futures = {name: _pool().submit(run, net) for name, net in nets.items()}
    return {name: f.result() for name, f in futures.items()}


def parallel_default(device: torch.device) -> bool:
    """Run the branches in threads on a CPU with more than one thread (a GPU queues the kernels of
    both branches on one stream anyway)."""
    return device.type == "cpu" and torch.get_num_threads() > 1
