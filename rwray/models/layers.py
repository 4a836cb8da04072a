"""Small building blocks shared by the model files."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["batch", "group"]


def norm2d(kind: Norm, channels: int) -> nn.Module:
    # GroupNorm makes every sample's forward independent of the rest of the batch, which is what a per-sample
    # gradient means without caveats (batch reweighting); BatchNorm is the seeds' default.
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(min(8, channels), channels)


class NormedLinear(nn.Module):
    """Cosine classifier used by the LDAM recipe: logits_k = <x/|x|, w_k/|w_k|> in [-1, 1]; LDAM scales them by s."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B, K]
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)


def head(in_features: int, num_classes: int, normed: bool) -> nn.Module:
    return NormedLinear(in_features, num_classes) if normed else nn.Linear(in_features, num_classes)
