"""Small building blocks shared by the model files."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from rwray.registry import Params

Norm = Literal["batch", "group"]


class NormParams(Params):
    """The normalisation every model's params share."""

    norm: Norm = "batch"
    # BatchNorm statistics over the global batch (all workers' samples) instead of each worker's share: what a
    # single-GPU recipe's BatchNorm saw when its batch is now spread over several workers (rwray.models.sync_bn).
    sync_bn: bool = False

    @model_validator(mode="after")
    def _sync_needs_batch_norm(self) -> "NormParams":
        if self.sync_bn and self.norm != "batch":
            raise ValueError(f"sync_bn synchronises BatchNorm statistics; norm: {self.norm} has none (each sample "
                             f"is normalised on its own): drop sync_bn or use norm: batch")
        return self


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
