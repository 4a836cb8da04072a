"""Focal loss (Lin et al., ICCV 2017): FL_i = (1 − p_{t,i})^γ · CE_i, with p_t = softmax(z)_y = exp(−CE).

γ = 0 is CE exactly; larger γ shrinks the loss of well-classified samples. No α class weight here: class weights
come from stacking (e.g. ABSGD) or from cb_ce.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from rwray.datainfo import DataInfo
from rwray.losses.base import PerSampleLoss
from rwray.losses.ce import cross_entropy
from rwray.registry import Params


class FocalParams(Params):
    name: Literal["focal"] = "focal"
    gamma: float = Field(1.0, ge=0.0, description="focusing exponent; 0 = cross-entropy")


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """[B, K], [B] -> [B] float32."""
    ce = cross_entropy(logits, targets)  # [B], = −log p_t
    if gamma == 0.0:
        return ce  # (1 − p_t)^0 = 1: return CE itself, bit for bit, gradient included
    # 1 − p_t = 1 − exp(−CE) = −expm1(−CE): no cancellation for confident samples (CE ≈ 0).
    # The floor keeps (1 − p_t)^(γ−1) finite in the backward pass when γ < 1 and p_t rounds to 1; below it the
    # clamp passes no gradient, which is the right limit (the loss is 0 there).
    one_minus_pt = (-torch.expm1(-ce)).clamp_min(1e-30)  # [B]
    return one_minus_pt.pow(gamma) * ce


class FocalLoss(PerSampleLoss):
    def __init__(self, params: FocalParams, info: DataInfo):
        super().__init__()
        self.gamma = params.gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, targets, self.gamma)
