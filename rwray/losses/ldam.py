"""LDAM (Cao et al., NeurIPS 2019): label-distribution-aware margins, optionally with deferred re-weighting (DRW).

Margins m_c ∝ n_c^(−1/4), scaled so the rarest class gets `max_m`. The target logit is lowered by its class margin
and all logits are scaled by s before CE:  ℓ_i = w_{y_i} · CE(s · (z_i − m_{y_i} · onehot(y_i)), y_i).

s = 30 assumes cosine logits in [−1, 1] (the LDAM recipe's normalised classifier head; `normed_head: true` for
resnet32 in the models module). With an ordinary linear head the logits are already unbounded and s = 30 makes the
softmax nearly one-hot; lower s (e.g. 1) in that case.

DRW: with `drw_epoch` set, w = 1 before that epoch and the class-balanced weights (β = 0.9999) from it on
(LDAM-DRW), reduced over the batch as cb_ce's ``reduction`` says (default: Σ w·ℓ / Σ w, the seeds'
``F.cross_entropy(weight=...)``). With `drw_epoch=None` there is no re-weighting at all (plain LDAM) — unlike
cb_ce, where None means "class-balanced from the start", because LDAM alone is a method of its own.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from rwray.datainfo import DataInfo
from rwray.losses.base import PerSampleLoss
from rwray.losses.class_balanced import (
    REDUCTION_DOC,
    DeferredClassWeights,
    Reduction,
    class_balanced_weights,
    class_counts,
    reduce_class_weighted,
)
from rwray.registry import Params


class LDAMParams(Params):
    name: Literal["ldam"] = "ldam"
    max_m: float = Field(0.5, gt=0.0, description="margin of the rarest class")
    s: float = Field(30.0, gt=0.0, description="logit scale (meant for cosine logits)")
    drw_epoch: int | None = Field(None, ge=0, description="class-balanced weights from this epoch on; None: never")
    beta: float = Field(0.9999, gt=0.0, lt=1.0, description="effective-number β of the DRW weights")
    reduction: Reduction = Field("weighted_mean", description=REDUCTION_DOC)


def ldam_margins(counts: torch.Tensor, max_m: float) -> torch.Tensor:
    """[C] counts -> [C] float32 margins m_c = max_m · n_c^(−1/4) / max_c' n_c'^(−1/4)."""
    raw = counts.to(torch.float64).clamp_min(1.0).pow(-0.25)  # [C]
    return (raw * (max_m / raw.max())).float()


def ldam_loss(
    logits: torch.Tensor, targets: torch.Tensor, margins: torch.Tensor, s: float, class_weights: torch.Tensor | None,
    reduction: Reduction = "weighted_mean",
) -> torch.Tensor:
    """[B, K], [B], [K] margins, scale, [K] weights or None -> [B] float32."""
    z = logits.float()  # [B, K]
    m = margins.to(device=z.device, dtype=z.dtype)[targets]  # [B] margin of each sample's own class
    onehot = F.one_hot(targets, z.shape[1]).to(z.dtype)  # [B, K]
    ce = F.cross_entropy(s * (z - m[:, None] * onehot), targets, reduction="none")  # [B]
    return reduce_class_weighted(ce, targets, class_weights, reduction)


class LDAMLoss(PerSampleLoss):
    def __init__(self, params: LDAMParams, info: DataInfo):
        super().__init__()
        counts = class_counts(info)  # [C] float64
        self.margins = ldam_margins(counts, params.max_m)  # [C]
        self.s = params.s
        self.reduction = params.reduction
        # drw_epoch=None -> no re-weighting: no DeferredClassWeights at all (its None means "always on").
        self.weights = (
            None if params.drw_epoch is None else DeferredClassWeights(class_balanced_weights(counts, params.beta), params.drw_epoch)
        )

    def begin_epoch(self, epoch: int) -> None:
        if self.weights is not None:
            self.weights.begin_epoch(epoch)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.margins.device != logits.device:
            self.margins = self.margins.to(logits.device)
        w = None if self.weights is None else self.weights.current(logits.device)
        return ldam_loss(logits, targets, self.margins, self.s, w, self.reduction)
