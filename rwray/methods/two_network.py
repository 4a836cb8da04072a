"""The trainer path shared by ReBias (Bahng et al., "Learning De-biased Representations with Biased Representations",
ICML 2020) and the two-network baselines of its Biased-MNIST table (RUBi, LearnedMixin+H).

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
                 (both in baselines.py: one network, no TwoNetMethod)

All of f's objective comes back through the contract: per-sample `losses` with all-ones `weights`, plus ReBias's
`penalty`. g's feature passes: `n_g_updates` forward+backward passes, then one fresh forward without gradient (train
mode, so BatchNorm uses batch statistics exactly as in the reference trainer; its running statistics are therefore
updated twice per step) whose features enter f's objective, so f always sees the g it alternates with.

Auxiliary heads (RUBi's fc: g_feat -> K, LearnedMixin's fc: f_feat -> 1) are trained here too, with their own
optimizer (the `g_optim` settings), by an exact split of the joint loss: their gradient needs only the *values* of
f's outputs, so they are updated from a loss on f's detached outputs, while f's loss uses the heads' pre-update
values (detached copies). f and the heads thus get exactly the gradients of the joint objective at the same point.

Checkpoints: `state_dict` holds g (parameters and BatchNorm buffers), the auxiliary heads, their optimizers and the
method's running state (ReBias: the current σ); the learning-rate schedule is a pure function of the epoch (set in
begin_epoch), so it needs no state. The loop checkpoints at epoch ends.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BeforeValidator, Field, model_validator
from torch import nn

from rwray import dist
from rwray.datainfo import DataInfo
from rwray.methods.base import Method, Prepare, StepInputs
from rwray.models import MODELS, ModelConfig
from rwray.models.simple_conv import SimpleConvParams
from rwray.optim import OptimConfig, ScheduleConfig, build_optimizer, lr_factor, step_factor
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
    schedule: Literal["step", "cosine"] = Field("step", description="step: the milestones; cosine: from lr to 0 over "
                                                 "`epochs` (set it to the job's train.epochs)")
    epochs: int | None = Field(None, ge=1, description="the cosine's length in epochs")

    @model_validator(mode="after")
    def _cosine_needs_its_length(self) -> "AuxOptimParams":
        if self.schedule == "cosine" and self.epochs is None:
            raise ValueError("g_optim.schedule=cosine runs over g_optim.epochs: set it (the job's train.epochs)")
        if self.schedule == "cosine" and self.milestones:
            raise ValueError("g_optim: milestones belong to schedule=step; a cosine schedule has none")
        return self

    def lr_at(self, epoch: int) -> float:
        """g's learning rate during ``epoch`` (0-based)."""
        if self.schedule == "cosine":
            return self.lr * lr_factor(ScheduleConfig(name="cosine"), epoch, self.epochs)
        return self.lr * step_factor(self.milestones, self.gamma, epoch)

    def optim(self) -> OptimConfig:
        """The optimizer part as a job's `optim` section (SGD without Nesterov), for `rwray.optim.build_optimizer`."""
        return OptimConfig(name=self.name, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


def g_default() -> SimpleConvParams:
    return SimpleConvParams(kernel=1)


def _simple_conv_unless_named(v: Any) -> Any:
    # A g written without a name is a SimpleConvNet (the Biased-MNIST recipe: `g: {kernel: 1}`).
    return {"name": "simple_conv", **v} if isinstance(v, dict) and "name" not in v else v


# The biased network g: any registered model (simple_conv k=1 on Biased MNIST, bagnet18 on 9-class ImageNet).
GModel = Annotated[ModelConfig, BeforeValidator(_simple_conv_unless_named)]


# -------------------------------------------------------------------------------------------------------- helpers


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (AMP) -> float32; float32 and float64 pass unchanged. HSIC and CE need full precision."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, K], [B] -> [B] per-sample CE in at least float32.

    Not `rwray.losses.ce.cross_entropy`: that one always computes in float32 (batch reweighting's float64 tests rely
    on it), while here float64 stays float64 (the ReBias tests compare to hand-written updates at 1e-9 in float64).
    """
    return F.cross_entropy(full_precision(logits), y, reduction="none")


def feature_dim(model: nn.Module, info: DataInfo) -> int:
    """Width D of the model's pooled features: its `feature_dim` attribute, else one dummy forward (eval mode, no
    gradient, on the bare module so DDP runs no collective; BatchNorm statistics are untouched in eval mode)."""
    m = dist.unwrap(model)
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


# ---------------------------------------------------------------------------------------------- the trainer path


class TwoNetMethod(Method):
    """Shared machinery: g (and optional heads) built in `attach`, their optimizers, lr schedule, state."""

    tag = "twonet"  # metric prefix

    supports_compile = False  # hooks into the model; not checked under torch.compile

    def __init__(self, params: Any, info: DataInfo):
        super().__init__(params, info)
        self.g: nn.Module | None = None  # prepared (DDP under Ray)
        self.heads: dict[str, nn.Module] = {}  # prepared auxiliary heads
        self.opts: dict[str, torch.optim.Optimizer] = {}  # "g" and one per head group
        self.epoch = 0
        self._pending: dict[str, Any] | None = None  # a state loaded before attach

    # ----- construction -----------------------------------------------------------------------------------------
    def attach(self, model: nn.Module, prepare: Prepare, device: torch.device) -> None:
        g = MODELS.build(self.params.g, self.info).to(device)
        self.g = prepare(g)
        self.opts["g"] = self.aux_optimizer(self.g)
        self.build_heads(model, prepare, device)
        self._set_lr(self.epoch)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)

    def build_heads(self, model: nn.Module, prepare: Prepare, device: torch.device) -> None:
        """Subclasses add auxiliary heads to self.heads and their optimizer to self.opts."""

    def aux_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        """The `g_optim` optimizer over a (possibly prepared) module's parameters."""
        return build_optimizer(self.params.g_optim.optim(), dist.unwrap(module).parameters())

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
        return full_precision(logits), full_precision(feats)  # [B, K], [B, Dg]

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
            "g": dist.unwrap(self.g).state_dict(),
            "heads": {k: dist.unwrap(h).state_dict() for k, h in self.heads.items()},
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
        dist.unwrap(self.g).load_state_dict(state["g"])
        for k, h in self.heads.items():
            dist.unwrap(h).load_state_dict(state["heads"][k])
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
