"""Contrastive branch model (docs/method.md, "Branch 2: MT-NXent"): encoder + projection head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.config import ModelConfig
from common.models.encoder import HybridEncoder


class ProjectionHead(nn.Module):
    """Linear(D, hidden) → ReLU → Linear(hidden, out); 768 → 768 → 128 for the paper config."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ContrastiveModel(nn.Module):
    """forward(x (B, 3, S, S)) -> L2-normalised projections (B, proj_dim).

    Features are the encoder tokens after the final LayerNorm, mean-pooled over tokens.
    The projection head never leaves the target site.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder = HybridEncoder(cfg)
        self.head = ProjectionHead(cfg.embed_dim, cfg.proj_hidden, cfg.proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.encoder(x)
        return F.normalize(self.head(tokens.mean(dim=1)), dim=1)
