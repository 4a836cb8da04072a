"""Cross-entropy, one value per sample."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from rwray.datainfo import DataInfo
from rwray.losses.base import PerSampleLoss
from rwray.registry import Params


class CEParams(Params):
    name: Literal["ce"] = "ce"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0,
                                   description="ε: the target is (1 − ε)·onehot(y) + ε/K (Szegedy et al. 2016)")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """[B, K], [B] -> [B]: −Σ_k q_k log softmax(logits)_k with q = (1 − ε)·onehot(y) + ε/K (ε = 0: −log p_y),
    computed in float32 at least (AMP-safe)."""
    return F.cross_entropy(logits.float(), targets, reduction="none", label_smoothing=label_smoothing)


class CrossEntropy(PerSampleLoss):
    def __init__(self, params: CEParams, info: "DataInfo"):
        super().__init__()
        self.label_smoothing = params.label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, targets, self.label_smoothing)
