"""ReBias (Bahng et al., "Learning De-biased Representations with Biased Representations", ICML 2020): f is
trained to be statistically independent of a biased network g that is trained to depend on f,

  g: CE(g) − λ_g·HSIC(g_feat, f_feat.detach())        f: CE(f) + λ_f·HSIC(f_feat, g_feat.detach())

with g's update first (rwray/methods/two_network.py has the shared trainer path; rwray/hsic.py the estimators).
`g_features_for_f: pre_update` skips g's fresh forward and reuses the last update forward's features (a simultaneous
rather than alternating update; about 4 % of a step at digits scale, see docs/benchmarks-rebias.md).

Across workers (DDP) HSIC is computed on the GLOBAL batch: every worker all-gathers the detached features of both
networks ([B, 128] each, cheap) and puts its own rows back with their graph, so HSIC's gradient flows into the local
rows only. Each worker's local term is scaled by the world size N because DDP averages gradients: the averaged
gradient is then exactly ∇ HSIC(global batch). With per-sample normalisation (GroupNorm, or none) N workers x B
samples give the same g and f updates as 1 worker x N·B (BatchNorm normalises per worker, as for every method). The
unbiased estimator needs a global batch of at least 4 (biased: 2); a smaller last batch skips the HSIC terms.

σ of the RBF kernels: fixed (default 1, the Biased-MNIST setting) or "median" (the ImageNet setting). Median: at
begin_epoch a window opens; during the first ⌈median_fraction · steps_per_epoch⌉ steps of the epoch (the loader is
shuffled, so a random quarter of the batches) the gathered f and g features are stored, and when the window is
complete σ_f and σ_g are set to the median pairwise distance of (up to median_max_samples of) those rows, for the
rest of this epoch and the next epoch's window. steps_per_epoch is estimated from the training-set size and the
global batch of the epoch's first step (identical on all workers, so the recompute happens at the same step
everywhere). Before the first window of a run completes, σ is the median of the current global batch. The reference
computes the same statistic with an extra pass over 25 % of the loader after each epoch; the contract gives methods
no loader, and this way costs no extra forward pass.

Checkpoints carry the current σ with g's state; the loop checkpoints at epoch ends, when no median window is open; a
window's rows are not saved.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from rwray import dist
from rwray.datainfo import DataInfo
from rwray.hsic import MIN_SAMPLES, Estimator, hsic, median_sigma
from rwray.methods.base import StepInputs, StepOutput
from rwray.methods.two_network import (
    AuxOptimParams,
    GModel,
    GlobalRows,
    TwoNetMethod,
    cross_entropy,
    full_precision,
    g_default,
)
from rwray.registry import Params


class ReBiasParams(Params):
    name: Literal["rebias"] = "rebias"
    lambda_f: float = Field(1.0, ge=0, description="weight of HSIC(f, g) in f's objective")
    lambda_g: float = Field(1.0, ge=0, description="weight of −HSIC(g, f) in g's objective")
    n_g_updates: int = Field(1, ge=1, description="g updates per batch, before f's update")
    g: GModel = Field(default_factory=g_default, description="the biased network (k = 1)")
    g_optim: AuxOptimParams = Field(default_factory=AuxOptimParams)
    estimator: Estimator = "unbiased"
    sigma: float | Literal["median"] = Field(1.0, description="RBF width for both feature spaces, or 'median'")
    median_fraction: float = Field(0.25, gt=0, le=1, description="share of an epoch's batches the median uses")
    median_max_samples: int = Field(1024, ge=2, description="rows the median's pairwise distances are taken over")
    seed: int = Field(0, description="seeds the median's row subsample")
    g_features_for_f: Literal["fresh", "pre_update"] = Field(
        "fresh", description="fresh: f's penalty uses g's features after its update (alternating, as the reference); "
        "pre_update: reuse the features of g's last update forward (simultaneous; saves one g forward per step)")

    @field_validator("sigma")
    @classmethod
    def _positive(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not v > 0:  # also rejects nan
            raise ValueError(f"sigma must be > 0 or 'median', got {v}")
        return v


def rbf_width(rows: torch.Tensor, max_samples: int, gen: torch.Generator, fallback: float | None) -> float | None:
    """σ by the median heuristic: the median pairwise distance of rows [n, D] (of a seeded subsample of up to
    max_samples rows); `fallback` when that is 0 or not finite (degenerate features, e.g. all rows equal)."""
    s = median_sigma(rows, max_samples, gen)
    return s if math.isfinite(s) and s > 0 else fallback


class ReBias(TwoNetMethod):
    tag = "rebias"

    def __init__(self, params: ReBiasParams, info: DataInfo):
        super().__init__(params, info)
        fixed = None if params.sigma == "median" else float(params.sigma)
        self.sigma_f: float | None = fixed  # RBF width on f's features; None: no median known yet
        self.sigma_g: float | None = fixed
        self._window: list[tuple[torch.Tensor, torch.Tensor]] = []  # gathered (f rows, g rows) of the open window
        self._window_steps: int | None = None  # steps in this epoch's window, fixed at the epoch's first step
        self._collecting = params.sigma == "median"
        self._hsic_sum, self._hsic_steps = 0.0, 0

    @property
    def median(self) -> bool:
        return self.params.sigma == "median"

    def begin_epoch(self, epoch: int) -> None:
        super().begin_epoch(epoch)
        self._window, self._window_steps, self._collecting = [], None, self.median
        self._hsic_sum, self._hsic_steps = 0.0, 0

    # ----- σ --------------------------------------------------------------------------------------------------------
    def _sigma(self, which: str, rows: torch.Tensor) -> float:
        s = self.sigma_f if which == "f" else self.sigma_g
        if s is not None:
            return s
        # First window of the run not complete yet: the current global batch's median (a seeded subsample, so every
        # worker draws the same rows; the global RNG is seeded per rank by the loop).
        return rbf_width(rows, self.params.median_max_samples, self._generator(), 1.0)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.params.seed * 1_000_003 + self.epoch)

    def _close_window(self) -> None:
        """σ_f, σ_g <- median pairwise distance over the window's rows (identical on every worker: rows are global)."""
        if self._window:
            gen = self._generator()
            f_rows = torch.cat([f for f, _ in self._window])  # [n, Df]
            g_rows = torch.cat([g for _, g in self._window])  # [n, Dg]
            for which, rows in (("f", f_rows), ("g", g_rows)):  # degenerate features keep the previous width
                name = f"sigma_{which}"
                setattr(self, name, rbf_width(rows, self.params.median_max_samples, gen, getattr(self, name)))
        self._window, self._collecting = [], False

    def _collect(self, f_all: torch.Tensor, g_all: torch.Tensor) -> None:
        if self._window_steps is None:
            steps = math.ceil(self.info.num_train / max(1, f_all.shape[0]))  # estimated steps in this epoch
            self._window_steps = max(1, math.ceil(self.params.median_fraction * steps))
        self._window.append((f_all, g_all))
        if len(self._window) >= self._window_steps:
            self._close_window()

    # ----- step ---------------------------------------------------------------------------------------------------
    def step(self, inputs: StepInputs) -> StepOutput:
        p = self.params
        n_workers = dist.world_size()
        rows = GlobalRows(inputs.y.shape[0], inputs.x.device)
        f_feat = full_precision(inputs.features)  # [B, Df] with graph
        f_all = rows.gather(f_feat)  # [M, Df] detached, global
        use_hsic = rows.total >= MIN_SAMPLES[p.estimator]
        sig_f = self._sigma("f", f_all) if use_hsic else 1.0

        last: dict[str, torch.Tensor] = {}  # the last update forward's detached g outputs (for pre_update)

        def g_penalty(g_feat: torch.Tensor) -> torch.Tensor | None:  # −λ_g·N·HSIC(g, f.detach()), local rows carry grad
            last["feat"] = g_feat.detach()
            if not (use_hsic and p.lambda_g > 0):
                return None
            g_all = last["all"] = rows.gather(g_feat)  # [M, Dg]
            h = hsic(rows.with_local_grad(g_all, g_feat), f_all, self._sigma("g", g_all), sig_f, p.estimator)
            return -p.lambda_g * n_workers * h

        for _ in range(p.n_g_updates):
            g_ce, g_pen = self.g_update(inputs, g_penalty, keep_logits=last)

        if p.g_features_for_f == "fresh":
            g_logits, g_feat = self.g_eval(inputs)  # fresh features of the updated g, [B, K], [B, Dg]
            g_all = rows.gather(g_feat)  # [M, Dg]
        else:  # the last update forward's outputs, from before that update
            g_logits, g_feat = last["logits"], last["feat"]
            g_all = last["all"] if "all" in last else rows.gather(g_feat)
        if self._collecting:
            self._collect(f_all, g_all)
        losses = cross_entropy(inputs.logits, inputs.y)  # [B] f's CE, with graph
        metrics = {"g_ce": g_ce, "g_acc": (g_logits.argmax(1) == inputs.y).double().mean()}
        penalty = None
        if use_hsic:
            sig_f, sig_g = self._sigma("f", f_all), self._sigma("g", g_all)  # the window may just have closed
            f_rows = rows.with_local_grad(f_all, f_feat) if p.lambda_f > 0 else f_all
            h_f = hsic(f_rows, g_all, sig_f, sig_g, p.estimator)  # [] HSIC(f, g) of the global batch
            if p.lambda_f > 0:
                penalty = p.lambda_f * n_workers * h_f
            metrics["hsic"] = h_f.detach()
            if g_pen is not None:
                metrics["hsic_g"] = -g_pen / (p.lambda_g * n_workers)  # HSIC(g, f) at g's last update
        out = self.scalars(self.tag, metrics)
        if "rebias/hsic" in out:
            self._hsic_sum += out["rebias/hsic"]
            self._hsic_steps += 1
        return StepOutput(losses=losses, weights=torch.ones_like(losses).detach(), penalty=penalty, metrics=out)

    def end_epoch(self, epoch: int) -> dict[str, float]:
        if self._collecting and self._window:  # the epoch had fewer steps than estimated: use what was collected
            self._close_window()
        out: dict[str, float] = {}
        if self._hsic_steps:  # the same on every worker: each step's HSIC is of the global batch
            out["rebias/hsic"] = self._hsic_sum / self._hsic_steps
        if self.sigma_f is not None:
            out["rebias/sigma_f"] = float(self.sigma_f)
        if self.sigma_g is not None:
            out["rebias/sigma_g"] = float(self.sigma_g)
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"sigma_f": self.sigma_f, "sigma_g": self.sigma_g}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.median:  # a fixed σ comes from the config, so a resumed run may change it; a median is running state
            self.sigma_f = None if state["sigma_f"] is None else float(state["sigma_f"])
            self.sigma_g = None if state["sigma_g"] is None else float(state["sigma_g"])
