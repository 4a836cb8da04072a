"""The contract between the training loop and a reweighting method.

The loop runs the model, hands the method a `StepInputs`, and gets back a `StepOutput`: one loss per sample, one
weight per sample, an optional batch-level penalty and metrics. The loop then does the single weighted reduction
in `weighted_loss`. It never knows which method it is running.

Weights are relative to ERM: ERM gives every sample weight 1, so ``weighted_loss`` of ERM is the mean loss. Under
data parallelism each worker reduces its local batch with a mean and DDP averages the gradients, so a method whose
weights are computed from global-batch statistics (see `rwray.dist`) gives the same update on N workers x B samples
as on 1 worker x N*B.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from rwray.data.augment import Mix
from rwray.datainfo import DataInfo


@dataclass
class StepInputs:
    model: nn.Module  # the (possibly DDP-wrapped) model that produced `logits`
    x: torch.Tensor  # [B, C, H, W] augmented, normalised inputs
    y: torch.Tensor  # [B] int64 targets (possibly noisy)
    index: torch.Tensor  # [B] int64 stable sample ids from the shard `index` column
    logits: torch.Tensor  # [B, K] with graph
    features: torch.Tensor  # [B, D] penultimate (post-pooling) features, with graph
    epoch: int
    step: int  # step within the epoch
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # extra shard columns, [B] each
    mix: Mix | None = None  # mixup / CutMix: second targets and shares; only for methods with supports_mix
    lr: float = 0.0  # the optimizer's current lr (its last group: the classifier's under optim.classifier_lr)


@dataclass
class StepOutput:
    losses: torch.Tensor  # [B] per-sample loss, with graph
    weights: torch.Tensor  # [B] per-sample weight, detached; all ones = ERM
    penalty: torch.Tensor | None = None  # scalar added after the weighted reduction (e.g. an HSIC regulariser)
    metrics: dict[str, float] = field(default_factory=dict)  # averaged over the epoch's steps by the loop


def weighted_loss(out: StepOutput) -> torch.Tensor:
    """The one weighted reduction of the project: mean_i(w_i * l_i) (+ penalty)."""
    if out.weights.requires_grad:
        raise ValueError("method weights must be detached: gradients flow through the losses only")
    loss = (out.weights.to(out.losses.dtype) * out.losses).mean()
    return loss if out.penalty is None else loss + out.penalty


def sample_losses(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inputs: StepInputs) -> torch.Tensor:
    """The per-sample loss of a batch [B]: loss(logits, y), or for a mixed batch its mix,
    λ_b·loss(z_b, y_b) + (1 − λ_b)·loss(z_b, y2_b) (for CE, exactly CE against the mixed one-hot target)."""
    losses = loss(inputs.logits, inputs.y)  # [B]
    if inputs.mix is None:
        return losses
    lam = inputs.mix.lam.to(losses.dtype)
    return lam * losses + (1.0 - lam) * loss(inputs.logits, inputs.mix.y2)


Prepare = Callable[[nn.Module], nn.Module]  # wraps a module for data parallelism (DDP) and moves it to the device


class Method:
    """A reweighting method. Subclasses implement `step`; the rest are optional hooks.

    Running state (ABSGD's normaliser, score accumulators, auxiliary networks) lives on the instance and goes
    through `state_dict` / `load_state_dict`, so checkpoints carry it and a resumed run continues it.
    """

    # Whether the loop may run the model under torch.compile (train.compile). Methods that hook into the model
    # (per-sample gradient capture, auxiliary networks sharing its graph) say False until checked under compile.
    supports_compile = True
    # Whether the method trains on mixed batches (data.mix): its loss goes through `sample_losses`, and nothing
    # else that shapes its update reads the targets (class tables, groups: a mixed sample has no single class).
    supports_mix = False
    # Whether the method only makes sense with the feature extractor frozen (train.trainable: classifier), e.g. a
    # method that keeps training features across steps as if the network that made them were fixed.
    requires_frozen_features = False

    def __init__(self, params: Any, info: DataInfo):
        self.params = params
        self.info = info

    def attach(self, model: nn.Module, prepare: Prepare, device: torch.device) -> None:
        """Called once after the model is built and prepared; build auxiliary networks or hooks here."""

    def begin_epoch(self, epoch: int) -> None:
        """Called before each training epoch (stage switches such as DRW or two-stage lambda)."""

    def step(self, inputs: StepInputs) -> StepOutput:
        raise NotImplementedError

    def trains_model(self, epoch: int) -> bool:
        """Whether the loop updates the model during ``epoch``. False: only the method's own networks train (e.g.
        LearnedMixin's g alone before f starts); the loop still runs `step` and records its losses."""
        return True

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Called after each training epoch; returns epoch-level metrics to record."""
        return {}

    def artifacts(self, out_dir: str) -> list[str]:
        """Write files worth keeping with the run (score tables, plots) into out_dir; return their paths."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
