"""Symmetric cross-entropy (Wang et al., ICCV 2019) for noisy labels: ℓ = α · CE + β · RCE.

Reverse CE swaps the roles of prediction p = softmax(z) and label q = onehot(y): RCE = −Σ_k p_k · log q_k, with
log 0 clamped to A = log(1e−4) and p clamped to [1e−7, 1] (the reference implementation's constants). Since
log q_y = 0, RCE = −A · Σ_{k≠y} clamp(p_k) ≈ −A · (1 − p_y): bounded, hence robust to wrong labels.

Defaults α = 0.1, β = 1.0 are the SCE paper's CIFAR-10 setting (its CIFAR-100 setting is α = 6.0, β = 0.1).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from rwray.datainfo import DataInfo
from rwray.losses.base import PerSampleLoss
from rwray.registry import Params

PROB_FLOOR = 1e-7  # p clamped to [PROB_FLOOR, 1]
LABEL_FLOOR = 1e-4  # one-hot clamped to [LABEL_FLOOR, 1] before the log: log 0 -> log 1e-4 ≈ −9.21


class SCEParams(Params):
    name: Literal["sce"] = "sce"
    alpha: float = Field(0.1, ge=0.0, description="weight of CE (paper, CIFAR-10: 0.1)")
    beta: float = Field(1.0, ge=0.0, description="weight of reverse CE (paper, CIFAR-10: 1.0)")

    @model_validator(mode="after")
    def _not_both_zero(self) -> "SCEParams":
        if self.alpha == 0.0 and self.beta == 0.0:
            raise ValueError("sce: alpha and beta are both 0, the loss would be identically zero")
        return self


def symmetric_ce(logits: torch.Tensor, targets: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """[B, K], [B] -> [B] float32: α · CE + β · RCE."""
    z = logits.float()  # [B, K]
    ce = F.cross_entropy(z, targets, reduction="none")  # [B]
    p = F.softmax(z, dim=1).clamp(PROB_FLOOR, 1.0)  # [B, K]
    log_q = torch.log(F.one_hot(targets, z.shape[1]).to(z.dtype).clamp(LABEL_FLOOR, 1.0))  # [B, K]: 0 at y, A elsewhere
    rce = -(p * log_q).sum(dim=1)  # [B]
    return alpha * ce + beta * rce


class SymmetricCE(PerSampleLoss):
    def __init__(self, params: SCEParams, info: DataInfo):
        super().__init__()
        self.alpha, self.beta = params.alpha, params.beta

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return symmetric_ce(logits, targets, self.alpha, self.beta)
