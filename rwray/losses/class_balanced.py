"""Class-balanced cross-entropy (Cui et al., CVPR 2019) with optional deferred re-weighting (DRW, Cao et al. 2019).

Each class c gets the weight w_c ∝ (1 − β) / (1 − β^{n_c}), the inverse of its "effective number" of samples,
normalised so that Σ_c w_c = C (uniform weights are all ones, so the loss scale stays comparable to CE).

Two reductions of the weighted batch (``reduction``):

* ``weighted_mean`` (default): Σ_i w_{y_i}·ℓ_i / Σ_i w_{y_i} over the global batch — what the seeds'
  ``F.cross_entropy(weight=w)`` computes. The per-sample loss is w_{y_i}·ℓ_i / mean_global(w_y), the mean taken
  over every worker's batch (all-reduced, detached): the loop's mean over the batch, averaged over workers by DDP,
  is then exactly the seeds' ratio. On CIFAR-10-LT IF 100 with β = 0.9999 mean(w_y) is ~0.17 once DRW starts, so
  this step is ~6× the other one.
* ``mean``: Σ_i w_{y_i}·ℓ_i / B, the per-sample loss w_{y_i}·ℓ_i as it is. What a reweighting method stacked on
  top (ABSGD) weighs in its seed code (``reduction='none'``).

`class_balanced_weights`, `DeferredClassWeights` and `reduce_class_weighted` are reused by LDAM-DRW.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import Field

from rwray import dist
from rwray.datainfo import DataInfo
from rwray.losses.base import PerSampleLoss
from rwray.losses.ce import cross_entropy
from rwray.registry import Params


def class_counts(info: DataInfo) -> torch.Tensor:
    """[C] float64 global class counts from the manifest, checked against num_classes.

    A class with zero training samples is counted as 1: its weight / margin / prior only matters for a sample that
    cannot appear in training, and 0 would make β^0, n^(−1/4) and log n infinite for every formula here."""
    if len(info.class_counts) != info.num_classes:
        raise ValueError(f"class_counts has {len(info.class_counts)} entries for {info.num_classes} classes")
    return torch.tensor(info.class_counts, dtype=torch.float64).clamp_min(1.0)


def class_balanced_weights(counts: Sequence[float] | torch.Tensor, beta: float) -> torch.Tensor:
    """[C] counts -> [C] float32 weights (1 − β) / (1 − β^{n_c}), normalised to sum to C.

    Computed in float64: with β = 0.9999 the effective number 1 − β^n is ~1e-4 for n = 1, where float32 loses digits.
    """
    n = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1.0)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    # 1 − β^n = −expm1(n·log β): exact for β close to 1, where 1 − β**n would cancel.
    effective = -torch.expm1(n * torch.log(torch.tensor(beta, dtype=torch.float64)))  # [C]
    w = (1.0 - beta) / effective  # [C]
    return (w * (n.numel() / w.sum())).float()


class DeferredClassWeights:
    """Per-class loss weights that are uniform (ones) before `drw_epoch` and class-balanced from it on.

    `drw_epoch=None` means "never deferred" here: the CB weights hold from the start. (LDAM decides itself whether
    None means "no re-weighting at all"; see ldam.py.) The switch depends only on the epoch passed to
    `begin_epoch`, so a resumed run needs no saved state. Before any `begin_epoch` call the epoch-0 state holds.
    """

    def __init__(self, cb_weights: torch.Tensor, drw_epoch: int | None):
        self.cb = cb_weights  # [C] float32
        self.drw_epoch = drw_epoch
        self.active = self.is_active(0)

    def is_active(self, epoch: int) -> bool:
        return self.drw_epoch is None or epoch >= self.drw_epoch

    def begin_epoch(self, epoch: int) -> None:
        self.active = self.is_active(epoch)

    def current(self, device: torch.device) -> torch.Tensor | None:
        """[C] weights in force on `device`, or None while uniform (callers then skip the multiply)."""
        if not self.active:
            return None
        if self.cb.device != device:  # the loss module is not moved with the model; follow the data, once
            self.cb = self.cb.to(device)
        return self.cb


Reduction = Literal["weighted_mean", "mean"]
REDUCTION_DOC = ("weighted_mean: sum w_y*loss / sum w_y over the global batch, as F.cross_entropy(weight=w) "
                 "(the seeds'); mean: sum w_y*loss / B (what ABSGD's seed code weighs)")


class CBCEParams(Params):
    name: Literal["cb_ce"] = "cb_ce"
    beta: float = Field(0.9999, gt=0.0, lt=1.0, description="effective-number β; 0 would be CE, → 1 is inverse frequency")
    drw_epoch: int | None = Field(None, ge=0, description="uniform weights before this epoch, CB from it on; None: CB always")
    reduction: Reduction = Field("weighted_mean", description=REDUCTION_DOC)
    max_count: int | None = Field(None, ge=1, description="class counts capped at this before the effective number "
                                  "(ABSGD's iWildCam recipe: 10): every class with more samples weighs the same")


def reduce_class_weighted(per_sample: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None,
                          reduction: Reduction) -> torch.Tensor:
    """[B] unweighted per-sample losses, [B] targets, [K] class weights or None -> [B] weighted per-sample losses
    whose batch mean is the chosen reduction (see the module docstring). Collective under ``weighted_mean``: every
    worker calls it at every step."""
    if class_weights is None:  # uniform: both reductions are the plain mean
        return per_sample
    w = class_weights.to(device=per_sample.device, dtype=per_sample.dtype)[targets]  # [B]
    if reduction == "weighted_mean":
        return w * per_sample / dist.global_mean(w)  # [B]; the normaliser is a constant, as in F.cross_entropy
    return w * per_sample


def class_balanced_ce(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None,
                      reduction: Reduction = "weighted_mean") -> torch.Tensor:
    """[B, K], [B], [K] or None -> [B]: w_{y_i} · CE_i, over mean_global(w_y) under weighted_mean (float32 at
    least)."""
    return reduce_class_weighted(cross_entropy(logits, targets), targets, class_weights, reduction)


class ClassBalancedCE(PerSampleLoss):
    def __init__(self, params: CBCEParams, info: DataInfo):
        super().__init__()
        counts = class_counts(info)  # [C]
        if params.max_count is not None:
            counts = counts.clamp_max(float(params.max_count))
        self.weights = DeferredClassWeights(class_balanced_weights(counts, params.beta), params.drw_epoch)
        self.reduction = params.reduction

    def begin_epoch(self, epoch: int) -> None:
        self.weights.begin_epoch(epoch)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return class_balanced_ce(logits, targets, self.weights.current(logits.device), self.reduction)
