"""The TransUNet encoder: timm's R50+ViT-B/16 hybrid, exposing the ResNet skips the CUP
decoder needs.

The paper config builds exactly timm's ``vit_base_r50_s16_224`` (state-dict keys identical to
``timm.create_model``'s, no class token → 196 tokens at 224²). Scaled-down configs are the same code
with other numbers: fewer ResNet units, narrower ResNet, narrower/shallower ViT, smaller images.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import GroupNormAct, StdConv2dSame
from timm.layers.hybrid_embed import HybridEmbed
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from common.config import ModelConfig


def _build_vit(cfg: ModelConfig, in_chans: int = 3) -> VisionTransformer:
    w = cfg.resnet_width
    backbone = ResNetV2(
        layers=list(cfg.resnet_layers),
        channels=(4 * w, 8 * w, 16 * w),
        stem_chs=w,
        num_classes=0,
        global_pool="",
        in_chans=in_chans,
        preact=False,
        stem_type="same",
        conv_layer=partial(StdConv2dSame, eps=1e-8),
        # GroupNorm(32) as in TransUNet; narrower test nets use fewer groups (all widths are
        # multiples of w)
        norm_layer=partial(GroupNormAct, num_groups=min(32, w)),
    )
    return VisionTransformer(
        img_size=cfg.img_size,
        patch_size=1,
        in_chans=in_chans,
        num_classes=0,
        global_pool="",  # 'avg' would silently skip the final LayerNorm in forward_head
        class_token=False,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        embed_layer=partial(HybridEmbed, backbone=backbone),
    )


class HybridEncoder(nn.Module):
    """R50+ViT encoder returning tokens and the three CNN skips.

    Input: (B, 3, S, S) in [0, 1]. Output: ``tokens`` (B, (S/16)², D) after the final LayerNorm and
    ``skips`` = [1/8 (8w ch), 1/4 (4w ch), 1/2 (w ch)] — the order the decoder consumes them.
    """

    def __init__(self, cfg: ModelConfig, in_chans: int = 3):
        super().__init__()
        self.cfg = cfg
        self.vit = _build_vit(cfg, in_chans)
        self.grid = cfg.img_size // 16
        w = cfg.resnet_width
        self.skip_channels = (8 * w, 4 * w, w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        vit = self.vit
        embed = vit.patch_embed
        # [stem 1/2, stage1 1/4, stage2 1/8, stage3 1/16]; checked equal to forward_features
        feats = embed.backbone.forward_intermediates(
            x, indices=[0, 1, 2, 3], intermediates_only=True
        )
        t = embed.proj(feats[-1]).flatten(2).transpose(1, 2)
        t = vit._pos_embed(t)
        t = vit.patch_drop(t)
        t = vit.norm_pre(t)
        t = vit.blocks(t)
        t = vit.norm(t)
        return t, [feats[2], feats[1], feats[0]]
