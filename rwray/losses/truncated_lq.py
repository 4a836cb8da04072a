"""Truncated Lq loss (Zhang & Sabuncu, NeurIPS 2018, "Generalized Cross Entropy") for noisy labels.

L_q(p_y) = (1 − p_y^q) / q interpolates between CE (q → 0) and MAE (q = 1). The truncated loss replaces it by the
constant L_q(k) = (1 − k^q) / q wherever p_y ≤ k, so samples the model finds implausible (likely mislabelled)
contribute no gradient.

What we implement, and how it differs from the paper: the paper optimises Σ_i v_i · L_q(p_i) with binary pruning
weights v_i, re-estimated every 10 epochs from `start_prune` (40) on. Here the truncation is a per-sample clamp
evaluated at every step, i.e. the pruning set is refreshed continuously instead of every 10 epochs (a sample comes
back as soon as p_y > k). Like the paper, it only starts at `truncate_epoch` (default 40): truncating from epoch 0
would zero every gradient of a freshly initialised C-class model, whose p_y ≈ 1/C ≤ k. Before that it is plain L_q
(GCE). The seed implementation subtracts L_q(k) from every value; a constant shift changes neither the gradients
nor the ABSGD weights (they are invariant to adding a constant to all losses), so we keep the paper's values.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from rwray.datainfo import DataInfo
from rwray.losses.base import PerSampleLoss
from rwray.losses.ce import cross_entropy
from rwray.registry import Params


class LqParams(Params):
    name: Literal["lq"] = "lq"
    q: float = Field(0.7, gt=0.0, le=1.0, description="Lq exponent: → 0 is CE, 1 is MAE")
    k: float = Field(0.5, ge=0.0, lt=1.0, description="truncation threshold on p_y (0: never truncates)")
    truncate_epoch: int | None = Field(40, ge=0, description="truncate from this epoch on; None: never (plain GCE)")


def truncated_lq(logits: torch.Tensor, targets: torch.Tensor, q: float, k: float, truncate: bool) -> torch.Tensor:
    """[B, K], [B] -> [B] float32."""
    log_py = -cross_entropy(logits, targets)  # [B] log p_y, float32
    lq = -torch.expm1(q * log_py) / q  # [B] (1 − p_y^q)/q, written so that p_y ≈ 1 does not cancel
    if not truncate or k == 0.0:
        return lq
    floor = (1.0 - k**q) / q
    # p_y ≤ k compared in log space (log p_y ≤ log k): same set, no exp of very negative numbers.
    return torch.where(log_py <= math.log(k), torch.full_like(lq, floor), lq)


class TruncatedLq(PerSampleLoss):
    def __init__(self, params: LqParams, info: DataInfo):
        super().__init__()
        self.q, self.k, self.truncate_epoch = params.q, params.k, params.truncate_epoch
        self.truncate = self._active(0)

    def _active(self, epoch: int) -> bool:
        return self.truncate_epoch is not None and epoch >= self.truncate_epoch

    def begin_epoch(self, epoch: int) -> None:
        self.truncate = self._active(epoch)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return truncated_lq(logits, targets, self.q, self.k, self.truncate)
