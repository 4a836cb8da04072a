"""Balanced Meta-Softmax's Meta Sampler (Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition",
NeurIPS 2020), as learned class weights.

BALMS retrains the classifier on frozen features (the decoupled second stage) with Balanced Softmax, and learns how
often to draw each class: class c is drawn at the unnormalised rate w_c = sigmoid(θ_c), and θ follows the gradient of
a class-balanced CE *after one virtual SGD step of the classifier* on a batch drawn at those rates (a bi-level,
one-step look-ahead). The reference draws the batch with a Gumbel-softmax straight-through sampler over all N samples.

Here the rates act as importance weights over instance-balanced batches instead: sample i of class c weighs

    v_c = w_c / Σ_k π_k w_k        (π_k = n_k / N, the training class shares; over an epoch the mean weight is 1)

which gives the same expected loss as drawing with p_i ∝ w_{y_i} (Σ_i π-uniform · v_{y_i} ℓ_i = Σ_i p_i ℓ_i), needs
no change to how batches are read (so it runs on streamed shards too), and makes the look-ahead exactly
differentiable in θ (no straight-through estimate). The meta step, per training step, on the GLOBAL batch
(all-gathered features, so every worker computes the same θ and N workers × B update it as 1 worker × N·B does):

    W' = W − α ∇_W mean_b v_{y_b}(θ) ℓ(W f_b, y_b)            α: the optimizer's current learning rate
    L_meta(θ) = mean_c mean_j CE(W' m_{c,j}, c)              m: the meta set, ``slots`` features per class
    θ ← Adam(θ, ∇_θ L_meta, meta_lr)

The reference draws its meta batch class-aware from the training set and runs the frozen encoder on it; here the
meta set is a bank of the last ``slots`` training features seen per class (the encoder is frozen, so a stored
feature is what the encoder would give that augmented image now): no second forward pass, every class that has been
seen is in every meta step. The training step itself uses the weights from θ before its meta update (the reference
drew that batch before updating θ too). Only for a frozen encoder (train.trainable: classifier).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from rwray import dist
from rwray.datainfo import DataInfo
from rwray.losses import LOSSES, LossConfig
from rwray.losses.balanced_softmax import BalancedSoftmaxParams
from rwray.methods.base import Method, StepInputs, StepOutput
from rwray.registry import Params


class MetaSamplerParams(Params):
    name: Literal["meta_sampler"] = "meta_sampler"
    loss: LossConfig = BalancedSoftmaxParams()
    init_pow: float = Field(0.0, ge=0, description="initial rates w_c ∝ π_c^-init_pow (0: instance-balanced)")
    meta_lr: float = Field(0.001, gt=0, description="Adam step size of the class-rate logits θ")
    slots: int = Field(2, ge=1, le=64, description="meta-set features kept per class (the last ones seen)")


# ------------------------------------------------------------------------------------------- pure tensor functions


def initial_logits(counts: torch.Tensor, init_pow: float) -> torch.Tensor:
    """[C] class counts -> [C] θ with sigmoid(θ_c) = s_c / (min s + max s), s_c = π_c^-init_pow (the reference's
    initialisation: the rates lie in (0, 1), the extremes summing to 1). Absent classes get the rarest class's rate."""
    pi = counts.to(torch.float64) / counts.sum()
    pi = torch.where(pi > 0, pi, pi[pi > 0].min())
    s = pi.pow(-init_pow)
    return torch.logit(s / (s.min() + s.max())).to(torch.float32)


def class_weights(theta: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[C] θ, [C] counts -> [C] importance weights v_c = w_c / Σ_k π_k w_k, w = sigmoid(θ): uniform batches weighted
    by v have the expected loss of batches drawn with p_i ∝ w_{y_i}. Differentiable in θ."""
    w = torch.sigmoid(theta)
    pi = (counts / counts.sum()).to(w.dtype)
    return w / (pi * w).sum()


def lookahead_meta_loss(head: nn.Module, theta: torch.Tensor, counts: torch.Tensor, feats: torch.Tensor,
                        y: torch.Tensor, loss_fn, lr: float, bank: torch.Tensor, filled: torch.Tensor
                        ) -> torch.Tensor:
    """L_meta(θ): class-balanced CE on the meta set after one virtual SGD step (step size ``lr``) of ``head`` on the
    batch weighted by v(θ). feats [B, D] and y [B]: the (global) batch, detached; bank [C, S, D] with filled [C, S]
    bool. -> scalar with graph to θ (and through the virtual step's gradient, a second-order term)."""
    params = {k: p.detach().requires_grad_(True) for k, p in head.named_parameters()}
    v = class_weights(theta, counts)  # [C]
    losses = loss_fn(functional_call(head, params, (feats,)), y)  # [B]
    inner = (v[y] * losses).mean()
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
    fast = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
    c, s, d = bank.shape
    meta_logits = functional_call(head, fast, (bank.reshape(c * s, d),))  # [C·S, K]
    targets = torch.arange(c, device=bank.device).repeat_interleave(s)  # [C·S]
    ce = F.cross_entropy(meta_logits, targets, reduction="none").reshape(c, s)
    mask = filled.to(ce.dtype)
    per_class = (ce * mask).sum(1) / mask.sum(1).clamp(min=1)  # [C]
    present = filled.any(1).to(ce.dtype)  # [C]: classes with a feature in the meta set
    return (per_class * present).sum() / present.sum()


def bank_write(bank: torch.Tensor, filled: torch.Tensor, seen: torch.Tensor, feats: torch.Tensor, y: torch.Tensor
               ) -> None:
    """Store the batch's features in place as the last ``S`` seen per class (a ring per class, in batch order):
    bank [C, S, D], filled [C, S], seen [C] int64 (features of class c written so far)."""
    s = bank.shape[1]
    order = torch.argsort(y, stable=True)
    ys = y[order]
    occurrence = torch.arange(len(ys), device=y.device) - torch.searchsorted(ys, ys)  # rank within its class
    in_batch = torch.bincount(ys, minlength=bank.shape[0])  # [C]
    keep = occurrence >= in_batch[ys] - s  # the last S of each class: no slot is written twice
    ys, occurrence, rows = ys[keep], occurrence[keep], order[keep]
    slot = (seen[ys] + occurrence) % s
    bank[ys, slot] = feats[rows].to(bank.dtype)
    filled[ys, slot] = True
    seen += in_batch


# ------------------------------------------------------------------------------------------------ the thin class


class MetaSampler(Method):
    requires_frozen_features = True
    supports_compile = False  # the look-ahead differentiates through the classifier twice per step

    def __init__(self, params: MetaSamplerParams, info: DataInfo):
        super().__init__(params, info)
        self.loss = LOSSES.build(params.loss, info)
        self.counts = torch.tensor(info.class_counts, dtype=torch.float32)  # [C]
        self.theta = initial_logits(self.counts, params.init_pow).requires_grad_(True)  # [C]
        self.opt = torch.optim.Adam([self.theta], lr=params.meta_lr)
        self.bank: torch.Tensor | None = None  # [C, S, D], built at the first step (D from the features)
        self.filled = torch.zeros(info.num_classes, params.slots, dtype=torch.bool)
        self.seen = torch.zeros(info.num_classes, dtype=torch.int64)
        self.meta_sum = torch.zeros(2, dtype=torch.float64)  # this epoch's (Σ meta loss, meta steps): no host sync a step
        self._epoch: int | None = None  # the epoch meta_sum belongs to

    def attach(self, model: nn.Module, prepare, device: torch.device) -> None:
        self.head = getattr(dist.unwrap(model), "fc", None)  # every model of the registry names its classifier fc
        if not isinstance(self.head, nn.Module):
            raise ValueError(f"meta_sampler: {type(dist.unwrap(model)).__name__} has no classifier `fc` to look "
                             f"ahead with")
        self.counts, self.filled, self.seen = self.counts.to(device), self.filled.to(device), self.seen.to(device)
        self.meta_sum = self.meta_sum.to(device)
        self.theta = self.theta.detach().to(device).requires_grad_(True)
        state = self.opt.state_dict()
        self.opt = torch.optim.Adam([self.theta], lr=self.params.meta_lr)
        self.opt.load_state_dict(state)  # moves Adam's moments to the device

    def begin_epoch(self, epoch: int) -> None:
        self.loss.begin_epoch(epoch)
        if epoch != self._epoch:  # a mid-epoch resume keeps the epoch's sums from its checkpoint
            self.meta_sum.zero_()
        self._epoch = epoch

    def step(self, inputs: StepInputs) -> StepOutput:
        losses = self.loss(inputs.logits, inputs.y)  # [B]
        with torch.no_grad():
            weights = class_weights(self.theta, self.counts)[inputs.y]  # [B], θ before this step's meta update
        feats = dist.all_gather_cat(inputs.features.detach().float())  # [B_global, D]
        y = dist.all_gather_cat(inputs.y)  # [B_global]
        if self.bank is None:  # the run's first step: no meta set yet (it is the classes seen before a batch)
            self.bank = torch.zeros(*self.filled.shape, feats.shape[1], device=feats.device)
        else:
            with torch.autocast(feats.device.type, enabled=False):
                meta = lookahead_meta_loss(self.head, self.theta, self.counts, feats, y, self.loss, inputs.lr,
                                           self.bank, self.filled)
                self.opt.zero_grad(set_to_none=True)
                meta.backward(inputs=[self.theta])
            self.opt.step()
            self.meta_sum += torch.stack([meta.detach().double(), torch.ones((), dtype=torch.float64,
                                                                             device=meta.device)])
        bank_write(self.bank, self.filled, self.seen, feats, y)
        return StepOutput(losses=losses, weights=weights.to(losses.dtype))

    def end_epoch(self, epoch: int) -> dict[str, float]:
        v = class_weights(self.theta.detach(), self.counts)
        present = self.counts > 0
        total, steps = self.meta_sum.tolist()
        return {**({"meta/loss": total / steps} if steps else {}),  # over the steps that had a meta set
                "meta/weight_max": float(v[present].max()), "meta/weight_min": float(v[present].min()),
                "meta/classes_in_meta_set": float(self.filled.any(1).sum())}

    def artifacts(self, out_dir: str) -> list[str]:
        """The learned class weights beside the class counts (meta_class_weights.csv)."""
        import csv
        from pathlib import Path

        path = Path(out_dir) / "meta_class_weights.csv"
        v = class_weights(self.theta.detach(), self.counts).cpu().tolist()
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "train_count", "rate_sigmoid_theta", "weight"])
            rates = torch.sigmoid(self.theta.detach()).cpu().tolist()
            for c, (n, rate, w) in enumerate(zip(self.counts.cpu().tolist(), rates, v)):
                writer.writerow([c, int(n), f"{rate:.6g}", f"{w:.6g}"])
        return [str(path)]

    def state_dict(self) -> dict[str, Any]:
        return {"theta": self.theta.detach().cpu(), "opt": self.opt.state_dict(), "filled": self.filled.cpu(),
                "seen": self.seen.cpu(), "bank": None if self.bank is None else self.bank.cpu(),
                "meta_sum": self.meta_sum.cpu(), "epoch": self._epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.counts.device
        with torch.no_grad():
            self.theta.copy_(state["theta"].to(device))
        self.opt.load_state_dict(state["opt"])
        self.filled, self.seen = state["filled"].to(device), state["seen"].to(device)
        self.bank = None if state["bank"] is None else state["bank"].to(device)
        self.meta_sum, self._epoch = state["meta_sum"].to(device), state["epoch"]
