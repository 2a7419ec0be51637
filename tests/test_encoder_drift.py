"""How far fine-tuning moves a pretrained encoder: linear CKA (common/cka.py) against the kernel
form of its definition, its invariances; ``finetune.encoder_lr_scale`` slows exactly the encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.cka import linear_cka
from common.config import load_experiment
from common.data.manifest import load_site
from common.stages import _parameter_groups, finetune, pretrain


def _slow_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA as HSIC of the linear kernels: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H))."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = x.double() @ x.double().t(), y.double() @ y.double().t()
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


def test_linear_cka_equals_the_kernel_definition_and_ignores_rotation_and_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 7, generator=g)
    y = x @ torch.randn(7, 5, generator=g) + 0.5 * torch.randn(40, 5, generator=g)
    assert linear_cka(x, y) == pytest.approx(_slow_cka(x, y), rel=1e-10)
    rotation, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    assert linear_cka(x, 3.0 * x.double() @ rotation + 2.0) == pytest.approx(1.0, abs=1e-12)
    unrelated = torch.randn(4000, 3, generator=g), torch.randn(4000, 3, generator=g)
    assert linear_cka(*unrelated) < 0.01
    with pytest.raises(ValueError, match="must be"):
        linear_cka(x, y[:-1])


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    from simulations.demo_data import demo_data

    root = tmp_path_factory.mktemp("drift")
    source, target = demo_data(Path("configs/tiny.yaml"), root / "data")
    return load_site(source), load_site(target)


def test_encoder_lr_scale_slows_the_pretrained_encoder_and_nothing_else(sites, tmp_path):
    source, target = sites
    sgd = {"finetune.optim.optimizer": "sgd", "finetune.optim.momentum": 0.0,
           "finetune.optim.lr": 0.05, "finetune.optim.max_steps": 1}  # fmt: skip
    cfg = load_experiment("configs/tiny.yaml", overrides=sgd)
    encoder = pretrain(cfg, "simmim", target, tmp_path / "pre", progress=False).state
    start = finetune(cfg, source, tmp_path / "x", encoder, "simmim",
                     progress=False)  # fmt: skip
    slow_cfg = load_experiment("configs/tiny.yaml",
                               overrides={**sgd, "finetune.encoder_lr_scale": 0.01})  # fmt: skip
    slow = finetune(slow_cfg, source, tmp_path / "y", encoder, "simmim", progress=False)
    # one plain SGD step: the update is lr x (gradient + decay), the same gradients in both
    for k, before in encoder.items():
        full, scaled = (
            start.state[f"encoder.vit.{k}"] - before,
            slow.state[f"encoder.vit.{k}"] - before,
        )
        torch.testing.assert_close(scaled, 0.01 * full, atol=1e-7, rtol=1e-4, msg=k)
    decoder = [
        k
        for k in start.state
        if not k.startswith("encoder.") and start.state[k].is_floating_point()
    ]
    for k in decoder:
        torch.testing.assert_close(slow.state[k], start.state[k], msg=k)
    # the lower bound starts from scratch: one rate for the whole net
    lower = _parameter_groups(torch.nn.Linear(2, 2), slow_cfg, "lower", None)
    assert not isinstance(next(iter(lower)), dict)
