"""Initialise the encoder from a local R50+ViT-B/16 checkpoint (no download, ever).

Formats: timm/PyTorch state dicts (``.pth``/``.pt``/``.bin``/``.safetensors``, with or without a
class token, e.g. timm's ``vit_base_r50_s16_224`` weights) and Google's JAX ``.npz`` (read by timm's
own loader, not by a hand-written key map). The class-token slot is dropped and the position
embedding is resampled to this config's grid with timm's ``resample_abs_pos_embed``.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed

from common.config import ModelConfig


class CheckpointError(ValueError):
    """A local backbone checkpoint cannot be read or does not fit the model; names the file."""


def _read_state(path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        from timm.layers.hybrid_embed import HybridEmbed
        from timm.models.vision_transformer import VisionTransformer

        from common.models.encoder import _build_vit

        plain = _build_vit(cfg)
        # Google checkpoints carry a class token: load them into a twin that has one, with timm's
        # loader
        twin = VisionTransformer(
            img_size=cfg.img_size,
            patch_size=1,
            num_classes=0,
            global_pool="",
            class_token=True,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            embed_layer=partial(HybridEmbed, backbone=plain.patch_embed.backbone),
        )
        twin.load_pretrained(str(path))
        return twin.state_dict()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def load_backbone_checkpoint(path: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Encoder tensors from a local file, keyed like ``encoder_state_dict`` (timm names).

    Raises:
        CheckpointError: the file is missing or unreadable (the message names it).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: backbone checkpoint not found (model.checkpoint)")
    try:
        state = _read_state(p, cfg)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure becomes one clear message
        raise CheckpointError(f"{p}: cannot read backbone checkpoint: {err}") from None
    state = {k.removeprefix("module."): v for k, v in state.items()}
    out = {
        k: v
        for k, v in state.items()
        if not k.startswith(("head.", "fc_norm.", "cls_token", "reg_token"))
    }
    if "pos_embed" in out:
        pe = out["pos_embed"]
        n = pe.shape[1]
        if math.isqrt(n) ** 2 != n:  # a class-token slot in front of the grid
            pe = pe[:, 1:]
        grid = cfg.img_size // 16
        if pe.shape[1] != grid * grid:
            pe = resample_abs_pos_embed(pe, new_size=(grid, grid), num_prefix_tokens=0)
        out["pos_embed"] = pe
    return out
