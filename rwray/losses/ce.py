"""Cross-entropy, one value per sample."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from rwray.datainfo import DataInfo
from rwray.losses.base import PerSampleLoss
from rwray.registry import Params


class CEParams(Params):
    name: Literal["ce"] = "ce"


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, K], [B] -> [B]: -log softmax(logits)[y], computed in float32 at least (AMP-safe)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


class CrossEntropy(PerSampleLoss):
    def __init__(self, params: CEParams, info: "DataInfo"):
        super().__init__()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, targets)
