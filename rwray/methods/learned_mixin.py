"""LearnedMixin+H (Clark et al., EMNLP 2019) as a baseline of ReBias's Biased-MNIST table: f is trained on its
logits mixed with the biased network's log-probabilities at a learned, per-sample scale, so it need not fit what g
explains; the entropy term keeps the scale from collapsing to 0,

  g: CE(g) for g_pretrain_epochs, then frozen (eval mode); g_pretrain: first (the ReBias code's
     --n_g_pretrain_epochs) trains g alone in those epochs, before f starts; alongside trains f from epoch 0
  f: CE(f_logits + s·log p_g) + w·H(softmax(s·log p_g)),  s = softplus(fc(f_feat))

fc is trained by the exact split of the joint loss described in rwray/methods/two_network.py.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rwray import dist
from rwray.methods.base import Prepare, StepInputs, StepOutput
from rwray.methods.two_network import (
    AuxOptimParams,
    GModel,
    TwoNetMethod,
    cross_entropy,
    feature_dim,
    full_precision,
    g_default,
)
from rwray.registry import Params


class LearnedMixinParams(Params):
    name: Literal["learned_mixin"] = "learned_mixin"
    entropy_weight: float = Field(0.36, ge=0, description="w of the +H entropy penalty (Clark et al.)")
    g_pretrain_epochs: int = Field(5, ge=0, description="epochs g trains on CE before it is frozen")
    g_pretrain: Literal["alongside", "first"] = Field(
        "alongside", description="alongside: f trains from epoch 0 while g pre-trains; first: the first "
        "g_pretrain_epochs epochs train g alone (f and its scale head wait), as the ReBias code does, so f trains "
        "train.epochs - g_pretrain_epochs epochs (set schedule.delay_epochs to g_pretrain_epochs so f's schedule "
        "starts with f)")
    g: GModel = Field(default_factory=g_default)
    g_optim: AuxOptimParams = Field(default_factory=AuxOptimParams)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """[B, K] -> [B] entropy of softmax(logits), from log-probabilities (no log 0)."""
    lp = F.log_softmax(logits, dim=1)
    return -(lp.exp() * lp).sum(dim=1)


def learned_mixin_loss(f_logits: torch.Tensor, scale: torch.Tensor, g_lp: torch.Tensor, y: torch.Tensor,
                       entropy_weight: float) -> torch.Tensor:
    """[B, K], [B, 1], [B, K], [B] -> [B]: CE(f + s·log p_g) + w·H(softmax(s·log p_g))."""
    bias = scale * g_lp  # [B, K]
    return cross_entropy(f_logits + bias, y) + entropy_weight * entropy(bias)


class LearnedMixin(TwoNetMethod):
    """LearnedMixin+H (Clark et al., EMNLP 2019). Clark mixes log p_f + s·log p_g; using f's logits instead of log p_f
    and log p_g instead of g's logits changes each row by a constant, which neither the softmax nor the entropy sees.

    With g_pretrain alongside, g trains on CE beside f for the first `g_pretrain_epochs` epochs (a 1x1 net learns the
    colour within the first epoch) and is frozen, in eval mode, afterwards; f is trained on the LearnedMixin+H
    objective throughout. With g_pretrain first, `trains_model` tells the loop to leave f alone (no backward, no
    optimizer step: zero loss weights would not do, as Adam's L2 weight decay alone moves each weight by ~lr per
    step) while g pre-trains, as the ReBias code's pretrain() does before f's epochs.
    """

    tag = "learned_mixin"

    def build_heads(self, model: nn.Module, prepare: Prepare, device: torch.device) -> None:
        fc = nn.Linear(feature_dim(model, self.info), 1).to(device)  # f_feat [B, Df] -> scale logit [B, 1]
        self.heads["fc"] = prepare(fc)
        self.opts["heads"] = self.aux_optimizer(fc)

    @property
    def g_frozen(self) -> bool:
        return self.epoch >= self.params.g_pretrain_epochs

    def trains_model(self, epoch: int) -> bool:
        return not (self.params.g_pretrain == "first" and epoch < self.params.g_pretrain_epochs)

    def step(self, inputs: StepInputs) -> StepOutput:
        w_h = self.params.entropy_weight
        metrics: dict[str, torch.Tensor] = {}
        if not self.trains_model(self.epoch):  # g alone: f's plain CE is recorded, nothing of f or fc moves
            metrics["g_ce"], _ = self.g_update(inputs)
            losses = cross_entropy(full_precision(inputs.logits).detach(), inputs.y)  # [B]
            return StepOutput(losses=losses, weights=torch.ones_like(losses), metrics=self.scalars(self.tag, metrics))
        if not self.g_frozen:
            metrics["g_ce"], _ = self.g_update(inputs)
        g_logits, _ = self.g_eval(inputs, train_mode=not self.g_frozen)  # frozen g: a fixed function (eval mode)
        g_lp = F.log_softmax(g_logits, dim=1)  # [B, K] no graph
        fc = self.heads["fc"]
        bare = dist.unwrap(fc)
        f_logits, f_feat = full_precision(inputs.logits), full_precision(inputs.features)
        # f's loss: gradient into f (through f_logits and f_feat) at fc's current values, held fixed. Cloned: the
        # loop back-propagates f's loss after fc's in-place update below, and autograd needs the values it saw.
        w, b = bare.weight.detach().clone(), bare.bias.detach().clone()  # [1, Df], [1]
        scale_f = F.softplus(F.linear(f_feat, w, b))  # [B, 1]
        losses = learned_mixin_loss(f_logits, scale_f, g_lp, inputs.y, w_h)  # [B]
        # fc's loss: the same objective on f's detached outputs, gradient into fc only.
        scale_h = F.softplus(fc(f_feat.detach()))  # [B, 1]
        head_loss = learned_mixin_loss(f_logits.detach(), scale_h, g_lp, inputs.y, w_h).mean()
        opt = self.opts["heads"]
        opt.zero_grad(set_to_none=True)
        head_loss.backward()
        opt.step()
        metrics.update(g_acc=(g_logits.argmax(1) == inputs.y).double().mean(), scale_mean=scale_f.detach().mean())
        return StepOutput(losses=losses, weights=torch.ones_like(losses).detach(), metrics=self.scalars(self.tag, metrics))

    def end_epoch(self, epoch: int) -> dict[str, float]:
        return {"learned_mixin/g_frozen": float(epoch >= self.params.g_pretrain_epochs)}  # during this epoch
