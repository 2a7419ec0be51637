"""TransUNet (R50-ViT-B/16 + CUP decoder) and the encoder hand-off between sites.

Decoder per Chen et al. 2021 (TransUNet): tokens → (D, S/16, S/16) → 3×3 conv-BN-ReLU to 512 →
four blocks (bilinear ×2, concat skip, two 3×3 conv-BN-ReLU), channels (256, 128, 64, 16), skips
1/8, 1/4, 1/2; the last block has none → 3×3 conv head. The model returns **logits**.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from common.config import ModelConfig
from common.models.encoder import HybridEncoder


class EncoderMismatchError(ValueError):
    """An encoder hand-off does not match this model's encoder schema."""


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int):
        super().__init__()
        self.up = nn.UpsamplingBilinear2d(scale_factor=2)
        self.conv1 = _conv_bn_relu(cin + skip, cout)
        self.conv2 = _conv_bn_relu(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class CUPDecoder(nn.Module):
    """Cascaded upsampler.

    Input tokens (B, N, D) + skips [1/8, 1/4, 1/2]; output (B, c_last, S, S).
    """

    def __init__(self, cfg: ModelConfig, skip_channels: tuple[int, int, int]):
        super().__init__()
        self.grid = cfg.img_size // 16
        self.conv_more = _conv_bn_relu(cfg.embed_dim, cfg.decoder_hidden)
        outs = cfg.decoder_channels
        ins = (cfg.decoder_hidden, *outs[:-1])
        skips = (*skip_channels, 0)
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, outs, strict=True)
        )

    def forward(self, tokens: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        b, n, d = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        x = self.conv_more(x)
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
        return x


class TransUNet(nn.Module):
    """Encoder + CUP decoder + 3×3 head. ``forward(x: (B,3,S,S)) -> logits (B, C, S, S)``."""

    def __init__(self, cfg: ModelConfig, num_classes: int = 1):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.encoder = HybridEncoder(cfg)
        self.decoder = CUPDecoder(cfg, self.encoder.skip_channels)
        self.head = nn.Conv2d(cfg.decoder_channels[-1], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, skips = self.encoder(x)
        return self.head(self.decoder(tokens, skips))


def build_transunet(cfg: ModelConfig, num_classes: int = 1) -> TransUNet:
    """A new TransUNet; if ``cfg.checkpoint`` names a local R50+ViT file, its encoder is loaded."""
    model = TransUNet(cfg, num_classes)
    if cfg.checkpoint:
        from common.models.checkpoint import load_backbone_checkpoint

        load_encoder(model, load_backbone_checkpoint(cfg.checkpoint, cfg))
    return model


def encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder hand-off: ResNet root and stages, patch projection, position embedding, ViT
    blocks, final norm — with timm's own key names. Decoder and heads are never included.

    ``model`` is anything with an ``.encoder`` (TransUNet, the SimMIM model, the contrastive model).
    Tensors are detached views (no copy).
    """
    return {k: v.detach() for k, v in model.encoder.vit.state_dict().items()}


def encoder_schema(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of every encoder tensor for ``cfg`` (built on the meta device)."""
    with torch.device("meta"):
        enc = HybridEncoder(cfg)
    return {k: (tuple(v.shape), v.dtype) for k, v in enc.vit.state_dict().items()}


def check_encoder_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise EncoderMismatchError unless ``state`` has exactly the encoder's names and shapes."""
    expected = model.encoder.vit.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k}: got {tuple(state[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped ({'; '.join(misshaped[:3])})")
    if problems:
        raise EncoderMismatchError(
            "encoder weights do not match this model: " + ", ".join(problems)
        )


def load_encoder(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load encoder tensors only (strict); decoder and head keep their values.

    Raises:
        EncoderMismatchError: any encoder tensor is missing, unexpected or mis-shaped — never a
            silent partial load (the authors' MIM loader trained from scratch that way).
    """
    check_encoder_state(model, state)
    model.encoder.vit.load_state_dict(dict(state), strict=True)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
