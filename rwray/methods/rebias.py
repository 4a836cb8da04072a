"""ReBias (Bahng et al., "Learning De-biased Representations with Biased Representations", ICML 2020) and the
baselines of its Biased-MNIST table, as methods of the one training loop.

Two networks: the target f (the loop's model; the reported one) and a biased network g of a restricted class
(SimpleConvNet with 1x1 kernels: it can see colour, never shape). One trainer path (`TwoNetMethod`) builds g, wraps
it with `prepare` (DDP under Ray), owns g's optimizer and learning-rate schedule, and updates g inside `step`, before
f's update on the same batch (alternating updates, as the reference trainer: g first, then f). The methods differ in
what g minimises and in f's objective:

  rebias         g: CE(g) − λ_g·HSIC(g_feat, f_feat.detach())   f: CE(f) + λ_f·HSIC(f_feat, g_feat.detach())
  rubi           g: CE(g)        f: CE(f_logits ⊙ sigmoid(fc(g_feat.detach())))   fc: that fused CE + CE(fc(g_feat))
  learned_mixin  g: CE(g) for g_pretrain_epochs, then frozen (eval mode)
                 f: CE(f_logits + s·log p_g) + w·H(softmax(s·log p_g)),  s = softplus(fc(f_feat))  (LearnedMixin+H)
  vanilla        f: CE(f) (no g; λ = 0)        biased: CE of the loop's model, which the job makes a k = 1 net

All of f's objective comes back through the contract: per-sample `losses` with all-ones `weights`, plus ReBias's
`penalty`. g's feature passes: `n_g_updates` forward+backward passes, then one fresh forward without gradient (train
mode, so BatchNorm uses batch statistics exactly as in the reference trainer; its running statistics are therefore
updated twice per step) whose features enter f's objective, so f always sees the g it alternates with. ReBias's
`g_features_for_f: pre_update` skips that forward and reuses the last update forward's features (a simultaneous
rather than alternating update; about 4 % of a step at digits scale, see docs/benchmarks-rebias.md).

Auxiliary heads (RUBi's fc: g_feat -> K, LearnedMixin's fc: f_feat -> 1) are trained here too, with their own
optimizer (the `g_optim` settings), by an exact split of the joint loss: their gradient needs only the *values* of
f's outputs, so they are updated from a loss on f's detached outputs, while f's loss uses the heads' pre-update
values (detached copies). f and the heads thus get exactly the gradients of the joint objective at the same point.

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

Checkpoints: `state_dict` holds g (parameters and BatchNorm buffers), the auxiliary heads, their optimizers and the
current σ; the learning-rate schedule is a pure function of the epoch (set in begin_epoch), so it needs no state.
The loop checkpoints at epoch ends, when no median window is open; a window's rows are not saved.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from rwray import dist
from rwray.datainfo import DataInfo
from rwray.methods.base import Method, Prepare, StepInputs, StepOutput
from rwray.methods.hsic import MIN_SAMPLES, Estimator, hsic, median_sigma
from rwray.models.simple_conv import SimpleConvNet, SimpleConvParams
from rwray.registry import Params

# ------------------------------------------------------------------------------------------------------- parameters


class AuxOptimParams(Params):
    """Optimizer of g and of the auxiliary heads. Defaults = the reference recipe for f and g on Biased MNIST:
    Adam, lr 1e-3, weight decay 1e-4 (L2, as torch.optim.Adam applies it). Set `milestones` to the job's f schedule
    (reference: StepLR every 20 epochs, x0.1) so both networks decay together."""

    name: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    milestones: list[int] = Field(default_factory=list, description="epochs at which lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, le=1)

    def lr_at(self, epoch: int) -> float:
        return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)

    def build(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)


def _g_default() -> SimpleConvParams:
    return SimpleConvParams(kernel=1)


class ReBiasParams(Params):
    name: Literal["rebias"] = "rebias"
    lambda_f: float = Field(1.0, ge=0, description="weight of HSIC(f, g) in f's objective")
    lambda_g: float = Field(1.0, ge=0, description="weight of −HSIC(g, f) in g's objective")
    n_g_updates: int = Field(1, ge=1, description="g updates per batch, before f's update")
    g: SimpleConvParams = Field(default_factory=_g_default, description="the biased network (k = 1)")
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


class RUBiParams(Params):
    name: Literal["rubi"] = "rubi"
    question_loss_weight: float = Field(1.0, ge=0, description="weight of CE(fc(g_feat)) in the head's loss")
    n_g_updates: int = Field(1, ge=1)
    g: SimpleConvParams = Field(default_factory=_g_default)
    g_optim: AuxOptimParams = Field(default_factory=AuxOptimParams)


class LearnedMixinParams(Params):
    name: Literal["learned_mixin"] = "learned_mixin"
    entropy_weight: float = Field(0.36, ge=0, description="w of the +H entropy penalty (Clark et al.)")
    g_pretrain_epochs: int = Field(5, ge=0, description="epochs g trains on CE before it is frozen")
    g: SimpleConvParams = Field(default_factory=_g_default)
    g_optim: AuxOptimParams = Field(default_factory=AuxOptimParams)


class VanillaParams(Params):
    name: Literal["vanilla"] = "vanilla"


class BiasedParams(Params):
    name: Literal["biased"] = "biased"


# -------------------------------------------------------------------------------------------------------- helpers


def _bare(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (what optimizers and state_dicts should see)."""
    return module.module if hasattr(module, "module") else module


def feature_dim(model: nn.Module, info: DataInfo) -> int:
    """Width D of the model's pooled features: its `feature_dim` attribute, else one dummy forward (eval mode, no
    gradient, on the bare module so DDP runs no collective; BatchNorm statistics are untouched in eval mode)."""
    m = _bare(model)
    d = getattr(m, "feature_dim", None)
    if isinstance(d, int):
        return d
    was_training = m.training
    p = next(m.parameters())
    try:
        m.eval()
        with torch.no_grad():
            _, feats = m(torch.zeros(2, *info.image_shape, device=p.device, dtype=p.dtype), return_features=True)
    finally:
        m.train(was_training)
    return int(feats.flatten(1).shape[1])


class GlobalRows:
    """Rows of one step's global batch: this worker's rows sit at [start, start + B) of the all-gathered tensor.

    `gather(t)` returns the detached [M, D] global tensor; `with_local_grad(all, t)` splices the local rows (with
    their graph) back in, so a function of the global batch back-propagates into this worker's samples only.
    """

    def __init__(self, local_batch: int, device: torch.device):
        self.b = local_batch
        if dist.is_distributed():
            sizes = dist.all_gather_cat(torch.tensor([local_batch], device=device))  # [N] batch size per rank
            self.start = int(sizes[: dist.rank()].sum())
            self.total = int(sizes.sum())
        else:
            self.start, self.total = 0, local_batch

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return dist.all_gather_cat(t.detach()) if dist.is_distributed() else t.detach()  # [M, D]

    def with_local_grad(self, all_rows: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        if not dist.is_distributed():
            return local
        return torch.cat([all_rows[: self.start], local, all_rows[self.start + self.b :]])  # [M, D]


def _full(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (AMP) -> float32; float32 and float64 pass unchanged. HSIC and CE need full precision."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, K], [B] -> [B] per-sample CE in at least float32."""
    return F.cross_entropy(_full(logits), y, reduction="none")


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """[B, K] -> [B] entropy of softmax(logits), from log-probabilities (no log 0)."""
    lp = F.log_softmax(logits, dim=1)
    return -(lp.exp() * lp).sum(dim=1)


# ---------------------------------------------------------------------------------------------- the trainer path


class TwoNetMethod(Method):
    """Shared machinery: g (and optional heads) built in `attach`, their optimizers, lr schedule, state."""

    tag = "twonet"  # metric prefix

    def __init__(self, params: Any, info: DataInfo):
        super().__init__(params, info)
        self.g: nn.Module | None = None  # prepared (DDP under Ray)
        self.heads: dict[str, nn.Module] = {}  # prepared auxiliary heads
        self.opts: dict[str, torch.optim.Optimizer] = {}  # "g" and one per head group
        self.epoch = 0
        self._pending: dict[str, Any] | None = None  # a state loaded before attach

    # ----- construction -----------------------------------------------------------------------------------------
    def attach(self, model: nn.Module, prepare: Prepare, device: torch.device) -> None:
        g = SimpleConvNet(self.params.g, self.info).to(device)
        self.g = prepare(g)
        self.opts["g"] = self.params.g_optim.build(list(_bare(self.g).parameters()))
        self.build_heads(model, prepare, device)
        self._set_lr(self.epoch)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)

    def build_heads(self, model: nn.Module, prepare: Prepare, device: torch.device) -> None:
        """Subclasses add auxiliary heads to self.heads and their optimizer to self.opts."""

    def _set_lr(self, epoch: int) -> None:
        lr = self.params.g_optim.lr_at(epoch)
        for opt in self.opts.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._set_lr(epoch)

    # ----- g ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _autocast(inputs: StepInputs):
        # g runs in the precision the loop ran f in (bf16 autocast on GPU): the feature dtype tells which.
        low = inputs.features.dtype in (torch.bfloat16, torch.float16)
        return torch.autocast(inputs.x.device.type, dtype=inputs.features.dtype if low else torch.bfloat16, enabled=low)

    def g_forward(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast(inputs):
            logits, feats = self.g(inputs.x, return_features=True)
        return _full(logits), _full(feats)  # [B, K], [B, Dg]

    def g_update(self, inputs: StepInputs, extra=None,
                 keep_logits: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step of g on CE(g) (+ extra(g_feat) if given). Returns detached (CE, extra); the forward's
        detached logits [B, K] go into keep_logits["logits"] when a dict is given."""
        self.g.train()
        logits, feats = self.g_forward(inputs)
        if keep_logits is not None:
            keep_logits["logits"] = logits.detach()
        ce = cross_entropy(logits, inputs.y).mean()
        loss, extra_value = ce, None
        if extra is not None:
            extra_value = extra(feats)
            if extra_value is not None:
                loss = loss + extra_value
        opt = self.opts["g"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return ce.detach(), None if extra_value is None else extra_value.detach()

    def g_eval(self, inputs: StepInputs, train_mode: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """g's logits and features without gradient (after its updates)."""
        self.g.train(train_mode)
        with torch.no_grad():
            return self.g_forward(inputs)

    # ----- checkpointing ----------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        if self.g is None:  # never attached: nothing trained yet (or a state waiting for attach)
            return dict(self._pending) if self._pending is not None else {}
        return {
            "g": _bare(self.g).state_dict(),
            "heads": {k: _bare(h).state_dict() for k, h in self.heads.items()},
            "opts": {k: o.state_dict() for k, o in self.opts.items()},
            "epoch": self.epoch,
            **self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.g is None:  # loaded before attach (e.g. a bare method object): applied when the nets exist
            self._pending = state
            return
        _bare(self.g).load_state_dict(state["g"])
        for k, h in self.heads.items():
            _bare(h).load_state_dict(state["heads"][k])
        for k, o in self.opts.items():
            # A copy: Optimizer.load_state_dict keeps same-device tensors by reference, and the caller's dict must not
            # alias live optimizer state (loading one state into two methods would otherwise couple them).
            o.load_state_dict(copy.deepcopy(state["opts"][k]))
        self.epoch = int(state["epoch"])
        self.load_extra_state(state)

    @staticmethod
    def scalars(prefix: str, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Detached scalars -> Python floats with one host sync."""
        if not values:
            return {}
        floats = torch.stack([v.detach().double().reshape(()) for v in values.values()]).tolist()
        return {f"{prefix}/{k}": float(v) for k, v in zip(values, floats)}


# ------------------------------------------------------------------------------------------------------- ReBias


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
        s = median_sigma(rows, self.params.median_max_samples, self._generator())
        return s if math.isfinite(s) and s > 0 else 1.0

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.params.seed * 1_000_003 + self.epoch)

    def _close_window(self) -> None:
        """σ_f, σ_g <- median pairwise distance over the window's rows (identical on every worker: rows are global)."""
        if self._window:
            gen = self._generator()
            f_rows = torch.cat([f for f, _ in self._window])  # [n, Df]
            g_rows = torch.cat([g for _, g in self._window])  # [n, Dg]
            for which, rows in (("f", f_rows), ("g", g_rows)):
                s = median_sigma(rows, self.params.median_max_samples, gen)
                if math.isfinite(s) and s > 0:  # degenerate features (all equal) keep the previous width
                    setattr(self, f"sigma_{which}", s)
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
        f_feat = _full(inputs.features)  # [B, Df] with graph
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


# --------------------------------------------------------------------------------------------------------- RUBi


class RUBi(TwoNetMethod):
    tag = "rubi"

    def build_heads(self, model: nn.Module, prepare: Prepare, device: torch.device) -> None:
        fc = nn.Linear(_bare(self.g).feature_dim, self.info.num_classes).to(device)  # g_feat [B, Dg] -> mask logits [B, K]
        self.heads["fc"] = prepare(fc)
        self.opts["heads"] = self.params.g_optim.build(list(fc.parameters()))

    def step(self, inputs: StepInputs) -> StepOutput:
        p = self.params
        for _ in range(p.n_g_updates):
            g_ce, _ = self.g_update(inputs)  # g: its own CE only
        g_logits, g_feat = self.g_eval(inputs)  # [B, K], [B, Dg] no graph: the bias encoder gets no fused gradient
        fc = self.heads["fc"]
        mask_logits = fc(g_feat)  # [B, K], graph into fc only
        mask = torch.sigmoid(mask_logits)
        f_logits = _full(inputs.logits)  # [B, K]
        losses = cross_entropy(f_logits * mask.detach(), inputs.y)  # [B] f's fused CE at fc's pre-update values
        head_loss = cross_entropy(f_logits.detach() * mask, inputs.y).mean() + p.question_loss_weight * cross_entropy(
            mask_logits, inputs.y
        ).mean()
        opt = self.opts["heads"]
        opt.zero_grad(set_to_none=True)
        head_loss.backward()
        opt.step()
        metrics = {"g_ce": g_ce, "g_acc": (g_logits.argmax(1) == inputs.y).double().mean(),
                   "mask_mean": mask.detach().mean()}
        return StepOutput(losses=losses, weights=torch.ones_like(losses).detach(), metrics=self.scalars(self.tag, metrics))


# ----------------------------------------------------------------------------------------------- LearnedMixin+H


class LearnedMixin(TwoNetMethod):
    """LearnedMixin+H (Clark et al., EMNLP 2019). Clark mixes log p_f + s·log p_g; using f's logits instead of log p_f
    and log p_g instead of g's logits changes each row by a constant, which neither the softmax nor the entropy sees.

    g is not pre-trained before f starts: the loop updates f on every batch of every epoch, and zero weights would not
    stop it (Adam's L2 weight decay alone moves each weight by ~lr per step). So g trains on CE alongside f for the
    first `g_pretrain_epochs` epochs (a 1x1 net learns the colour within the first epoch) and is frozen, in eval mode,
    afterwards; f is trained on the LearnedMixin+H objective throughout.
    """

    tag = "learned_mixin"

    def build_heads(self, model: nn.Module, prepare: Prepare, device: torch.device) -> None:
        fc = nn.Linear(feature_dim(model, self.info), 1).to(device)  # f_feat [B, Df] -> scale logit [B, 1]
        self.heads["fc"] = prepare(fc)
        self.opts["heads"] = self.params.g_optim.build(list(fc.parameters()))

    @property
    def g_frozen(self) -> bool:
        return self.epoch >= self.params.g_pretrain_epochs

    def _objective(self, f_logits: torch.Tensor, scale: torch.Tensor, g_lp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B, K], [B, 1], [B, K], [B] -> [B]: CE(f + s·log p_g) + w·H(softmax(s·log p_g))."""
        bias = scale * g_lp  # [B, K]
        return cross_entropy(f_logits + bias, y) + self.params.entropy_weight * _entropy(bias)

    def step(self, inputs: StepInputs) -> StepOutput:
        metrics: dict[str, torch.Tensor] = {}
        if not self.g_frozen:
            metrics["g_ce"], _ = self.g_update(inputs)
        g_logits, _ = self.g_eval(inputs, train_mode=not self.g_frozen)  # frozen g: a fixed function (eval mode)
        g_lp = F.log_softmax(g_logits, dim=1)  # [B, K] no graph
        fc = self.heads["fc"]
        bare = _bare(fc)
        f_logits, f_feat = _full(inputs.logits), _full(inputs.features)
        # f's loss: gradient into f (through f_logits and f_feat) at fc's current values, held fixed. Cloned: the
        # loop back-propagates f's loss after fc's in-place update below, and autograd needs the values it saw.
        w, b = bare.weight.detach().clone(), bare.bias.detach().clone()  # [1, Df], [1]
        scale_f = F.softplus(F.linear(f_feat, w, b))  # [B, 1]
        losses = self._objective(f_logits, scale_f, g_lp, inputs.y)  # [B]
        # fc's loss: the same objective on f's detached outputs, gradient into fc only.
        scale_h = F.softplus(fc(f_feat.detach()))  # [B, 1]
        head_loss = self._objective(f_logits.detach(), scale_h, g_lp, inputs.y).mean()
        opt = self.opts["heads"]
        opt.zero_grad(set_to_none=True)
        head_loss.backward()
        opt.step()
        metrics.update(g_acc=(g_logits.argmax(1) == inputs.y).double().mean(), scale_mean=scale_f.detach().mean())
        return StepOutput(losses=losses, weights=torch.ones_like(losses).detach(), metrics=self.scalars(self.tag, metrics))

    def end_epoch(self, epoch: int) -> dict[str, float]:
        return {"learned_mixin/g_frozen": float(epoch >= self.params.g_pretrain_epochs)}  # during this epoch


# ------------------------------------------------------------------------------------------------ f-only baselines


class Vanilla(Method):
    """f alone on CE: ReBias with λ = 0 and no g. Named separately from `erm` so the ReBias table reads clearly."""

    def step(self, inputs: StepInputs) -> StepOutput:
        losses = cross_entropy(inputs.logits, inputs.y)  # [B]
        return StepOutput(losses=losses, weights=torch.ones_like(losses).detach())


class Biased(Vanilla):
    """"g alone": the loop's model is the biased network, so the reported accuracies are g's. The job sets
    `model: {name: simple_conv, kernel: 1}`; this method is CE training and refuses a SimpleConvNet with k > 1, the
    one mistake it can detect (for other model families "restricted class" is the job's choice, e.g. a BagNet)."""

    def attach(self, model: nn.Module, prepare: Prepare, device: torch.device) -> None:
        m = _bare(model)
        if isinstance(m, SimpleConvNet) and m.kernel != 1:
            raise ValueError(
                f"method 'biased' trains the biased network g, a SimpleConvNet with 1x1 kernels, but the model has "
                f"kernel={m.kernel}. Set model.kernel=1 in the job (or use method 'vanilla' for the target network)."
            )
