"""Balanced Softmax (Ren et al., NeurIPS 2020) / logit adjustment (Menon et al., ICLR 2021).

Train on CE(z + τ · log n_c, y); predict with the raw z. With τ = 1 this is Balanced Softmax: the softmax of the
adjusted logits models the long-tailed training distribution, so the raw logits model the balanced one. A uniform
prior adds the same constant to every logit, which softmax ignores: it is CE exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from rwray.datainfo import DataInfo
from rwray.losses.base import PerSampleLoss
from rwray.losses.class_balanced import class_counts
from rwray.registry import Params


class BalancedSoftmaxParams(Params):
    name: Literal["balanced_softmax"] = "balanced_softmax"
    tau: float = Field(1.0, ge=0.0, description="prior exponent; 1 = Balanced Softmax, 0 = CE")


def balanced_softmax_loss(logits: torch.Tensor, targets: torch.Tensor, log_prior: torch.Tensor, tau: float) -> torch.Tensor:
    """[B, K], [B], [K] log counts (or log priors: a constant shift changes nothing) -> [B] float32."""
    z = logits.float()  # [B, K]
    return F.cross_entropy(z + tau * log_prior.to(device=z.device, dtype=z.dtype), targets, reduction="none")


class BalancedSoftmax(PerSampleLoss):
    def __init__(self, params: BalancedSoftmaxParams, info: DataInfo):
        super().__init__()
        self.tau = params.tau
        # [C] log(n_c / n_max): the shift by log n_max changes nothing (softmax is shift-invariant) but makes a
        # uniform prior exactly zero, so then z + τ·log_prior is z bit for bit and the loss is CE exactly.
        log_n = class_counts(info).log()  # [C] float64
        self.log_prior = (log_n - log_n.max()).float()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.log_prior.device != logits.device:
            self.log_prior = self.log_prior.to(logits.device)
        return balanced_softmax_loss(logits, targets, self.log_prior, self.tau)

    def predict_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits  # the prior is a training-time adjustment only: evaluate with the balanced (raw) logits
