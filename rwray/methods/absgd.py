"""ABSGD (Qi et al., "Attentional-Biased Stochastic Gradient Descent", TMLR 2023).

Objective (KL-regularised DRO): min_w λ · log( (1/n) Σ_i exp(ℓ_i(w)/λ) ). Its stochastic gradient weights each
sample by e_i = exp(ℓ_i/λ) over a moving-average estimate u of mean(e):

    u ← (1 − γ) · u + γ · α · mean_i(e_i)      (u starts at 0, is updated before use, persists across steps)
    p_i = e_i / (u · B),  loss = Σ_i p_i · ℓ_i   (p detached)

Our weights are relative to ERM (the loop takes mean_i(w_i ℓ_i)), so w_i = B · p_i = e_i / u = exp(ℓ_i/λ − log u).

* λ > 0 up-weights high-loss (minority, hard) samples; λ → ∞ is ERM up to the factor 1/α (and a start-up
  transient: u_t = α · (1 − (1 − γ)^t) · mean(e) when the losses do not move, like an un-bias-corrected EMA).
  λ unset or ≥ 200 is treated as ERM exactly (weights 1), as the reference code does.
* λ < 0 is the noisy-label variant: high-loss (likely mislabelled) samples are down-weighted, and the uniform floor
  p_i += 1/B (w_i += 1) is switched on automatically so no sample's gradient vanishes; `floor` overrides that.
  Note the floor makes the weights sum to about 2B, as in the reference code (an effective LR factor of ~2).
* λ = 0 is rejected: exp(ℓ/λ) is undefined there (λ → 0⁺ is max-loss training).
* Two stages: `init_lam` before `lam_epoch`, `lam` from it on (reference recipe: 200, i.e. ERM, then λ at
  epoch 160). u restarts from 0 whenever the active λ changes: the reference computes a plain mean loss while
  λ ≥ 200 and only starts its estimator at the switch, and an estimate of mean exp(ℓ/λ) made under a different λ is
  meaningless under the new one.

Everything is computed in log space in float64 (log u, ℓ/λ), so λ = 0.05 with losses of 100 (e = e^2000) is fine,
and the batch mean is the GLOBAL batch mean (`rwray.dist.global_logsumexp`): N workers × B samples give the same
weights as 1 worker × N·B. Nothing here carries autograd history (the reference never detaches u, so its graph grows
every step).

Any base loss stacks: the weights are computed from the base loss's per-sample value, class weights included.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from rwray import dist
from rwray.datainfo import DataInfo
from rwray.losses import LOSSES, LossConfig
from rwray.losses.ce import CEParams
from rwray.metrics import CLASS_METRICS_MAX
from rwray.methods.base import Method, StepInputs, StepOutput, sample_losses
from rwray.registry import Params

ERM_LAMBDA = 200.0  # λ ≥ this (or unset) means plain ERM, as in the reference code


def absgd_weights(
    losses: torch.Tensor, log_u: torch.Tensor, lam: float, gamma: float, alpha: float, floor: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ABSGD step: ([B] per-sample losses, [] log u) -> ([B] weights relative to ERM, [] new log u).

    Pure (no state). log u = −inf is the initial u = 0. All inputs are detached; the weights come back in the
    losses' dtype, log u in float64. Collective when a process group is running: every worker must call it.
    """
    if lam == 0:
        raise ValueError("ABSGD lambda must be nonzero")
    if not (0.0 < gamma <= 1.0) or not alpha > 0.0:
        raise ValueError(f"ABSGD needs gamma in (0, 1] and alpha > 0, got gamma={gamma}, alpha={alpha}")
    z = losses.detach().to(torch.float64) / lam  # [B] log e_i
    lse, count = dist.global_logsumexp(z)  # [] log Σ_global e_i, global sample count
    log_u = log_u.detach().to(device=z.device, dtype=torch.float64)
    if count == 0:  # nothing anywhere: u does not move
        return losses.detach().new_ones(losses.shape), log_u
    log_mean_e = lse - math.log(count)  # [] log mean_global(e)
    # log((1 − γ) u + γ α mean(e)); log(1 − γ) = −inf at γ = 1 makes the first term vanish (logaddexp(−inf, x) = x).
    log_decay = math.log1p(-gamma) if gamma < 1.0 else -math.inf
    new_log_u = torch.logaddexp(log_u + log_decay, log_mean_e + math.log(gamma * alpha))  # []
    w = torch.exp(z - new_log_u)  # [B] e_i / u; ≤ B/(γα) when λ > 0, so never overflows
    if floor:
        w = w + 1.0  # p_i += 1/B
    return w.to(losses.dtype), new_log_u


class ABSGDParams(Params):
    name: Literal["absgd"] = "absgd"
    loss: LossConfig = CEParams()
    lam: float | None = Field(None, description="λ; None or ≥ 200: ERM; < 0: noisy-label variant")
    init_lam: float | None = Field(None, description="λ before lam_epoch (None or ≥ 200: ERM)")
    lam_epoch: int | None = Field(None, ge=0, description="epoch at which lam replaces init_lam")
    gamma: float = Field(0.9, gt=0.0, le=1.0, description="moving-average rate of u")
    alpha: float = Field(1.0, gt=0.0, description="scale of the u update (steady-state weights ~ 1/alpha)")
    floor: bool | None = Field(None, description="uniform floor w += 1; None: on exactly when the active λ < 0")

    @field_validator("lam", "init_lam")
    @classmethod
    def _nonzero(cls, v: float | None) -> float | None:
        if v is not None and (v == 0 or math.isnan(v)):
            raise ValueError(
                "ABSGD lambda must be a nonzero number: the weights exp(loss/lambda) are undefined at lambda = 0. "
                "Use lambda > 0 to up-weight hard samples, < 0 for noisy labels, or leave it unset (or >= 200) for ERM."
            )
        return v

    @model_validator(mode="after")
    def _stages(self) -> "ABSGDParams":
        if self.init_lam is not None and self.lam_epoch is None:
            raise ValueError("ABSGD init_lam is only used before lam_epoch: set lam_epoch too")
        return self

    @model_validator(mode="after")
    def _per_sample_class_weights(self) -> "ABSGDParams":
        """ABSGD weighs each sample's own loss, w_y·ℓ_i as its seed code computes it (reduction='none'): a
        class-weighted base loss (cb_ce, ldam) defaults to reduction=mean here, not to the batch-normalised
        weighted_mean, whose per-sample values carry the batch's mean weight into exp(ℓ/λ). An explicit
        reduction is kept."""
        if "reduction" in type(self.loss).model_fields and "reduction" not in self.loss.model_fields_set:
            self.loss.reduction = "mean"
        return self


def _is_erm(lam: float | None) -> bool:
    return lam is None or lam >= ERM_LAMBDA


class ABSGD(Method):
    supports_mix = True  # weights come from the (mixed) per-sample loss; the class table only reports

    def __init__(self, params: ABSGDParams, info: DataInfo):
        super().__init__(params, info)
        self.loss = LOSSES.build(params.loss, info)
        self.log_u = torch.tensor(-math.inf, dtype=torch.float64)  # [] log u; −inf is u = 0
        self.active_lam = self.lambda_at(0)  # before any begin_epoch call, the epoch-0 stage holds
        c = info.num_classes
        # Per-class sums of weights and sample counts over the current epoch (this worker's samples), [C] float64.
        self._class_sum = torch.zeros(c, dtype=torch.float64)
        self._class_count = torch.zeros(c, dtype=torch.float64)
        self.history: list[tuple[int, list[float]]] = []  # (epoch, [C] global mean weight per class; nan: no sample)

    # ----- stages -----------------------------------------------------------------------------------------------
    def lambda_at(self, epoch: int) -> float | None:
        p = self.params
        if p.lam_epoch is not None and epoch < p.lam_epoch:
            return p.init_lam
        return p.lam

    def floor_for(self, lam: float) -> bool:
        return self.params.floor if self.params.floor is not None else lam < 0

    def begin_epoch(self, epoch: int) -> None:
        lam = self.lambda_at(epoch)
        if lam != self.active_lam:  # a new stage: the old estimate of mean exp(ℓ/λ) does not apply
            self.log_u = torch.tensor(-math.inf, dtype=torch.float64, device=self.log_u.device)
            self.active_lam = lam
        self.loss.begin_epoch(epoch)

    # ----- step -------------------------------------------------------------------------------------------------
    def step(self, inputs: StepInputs) -> StepOutput:
        losses = sample_losses(self.loss, inputs)  # [B] with graph
        lam = self.active_lam
        metrics: dict[str, float] = {}
        if _is_erm(lam):
            weights = torch.ones_like(losses).detach()  # [B] exactly ERM; u is not estimated in this stage
        else:
            floor = self.floor_for(lam)
            weights, self.log_u = absgd_weights(losses, self.log_u, lam, self.params.gamma, self.params.alpha, floor)
            # One host sync for all scalars; weight max/min are over this worker's samples.
            log_u, w_max, w_min = torch.stack(
                [self.log_u, weights.max().double(), weights.min().double()] if weights.numel() else [self.log_u] * 3
            ).tolist()
            metrics = {"absgd/lambda": float(lam), "absgd/log_u": log_u, "absgd/weight_max": w_max, "absgd/weight_min": w_min}
        self._accumulate(inputs.y, weights)
        return StepOutput(losses=losses, weights=weights, metrics=metrics)

    def _accumulate(self, y: torch.Tensor, weights: torch.Tensor) -> None:
        if self._class_sum.device != y.device:
            self._class_sum, self._class_count = self._class_sum.to(y.device), self._class_count.to(y.device)
        self._class_sum.index_add_(0, y, weights.detach().to(torch.float64))
        self._class_count.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))

    # ----- epoch-level reporting --------------------------------------------------------------------------------
    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Global per-class mean weight of the epoch (collective). Classes with no sample this epoch are omitted."""
        summed = dist.all_reduce_sum(torch.stack([self._class_sum, self._class_count]))  # [2, C]
        means = (summed[0] / summed[1]).cpu().tolist()  # [C], nan where the count is 0
        self.history.append((epoch, means))
        self._class_sum.zero_()
        self._class_count.zero_()
        seen = [m for m in means if not math.isnan(m)]
        if len(means) > CLASS_METRICS_MAX:  # K metrics an epoch would flood the store: the range, and the plot
            return {"weight/class_min": min(seen), "weight/class_max": max(seen)} if seen else {}
        return {f"weight/class_{c}": m for c, m in enumerate(means) if not math.isnan(m)}

    def artifacts(self, out_dir: str) -> list[str]:
        """absgd_class_weights.png: per-class mean weight, classes ordered head → tail, one line per epoch."""
        if not self.history:
            return []
        from rwray import plots  # matplotlib: imported where a figure is drawn, not by every process

        path = plots.class_weights_by_epoch(
            self.history, self.info.class_counts, f"ABSGD per-class mean weight, {len(self.history)} epoch(s)",
            "mean ABSGD weight (relative to ERM)", os.path.join(out_dir, "absgd_class_weights.png"))
        return [str(path)]

    # ----- checkpointing ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "log_u": float(self.log_u.item()),  # float64 -> Python float: exact
            "active_lam": self.active_lam,
            "class_sum": self._class_sum.cpu().tolist(),  # non-zero only for a mid-epoch checkpoint
            "class_count": self._class_count.cpu().tolist(),
            "history": [(e, list(m)) for e, m in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_u = torch.tensor(state["log_u"], dtype=torch.float64)
        self.active_lam = state["active_lam"]
        self._class_sum = torch.tensor(state["class_sum"], dtype=torch.float64)
        self._class_count = torch.tensor(state["class_count"], dtype=torch.float64)
        self.history = [(int(e), list(m)) for e, m in state["history"]]
