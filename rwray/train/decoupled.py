"""Decoupled training's second stage (Kang et al., "Decoupling Representation and Classifier for Long-Tailed
Recognition", ICLR 2020): the representation of a first-stage model is kept and only the classifier is trained
again, usually re-initialised and on class-balanced batches (cRT), or only rescaled per class (LWS).

`prepare_stage` applies train.init_from / trainable / reinit_classifier to a freshly built model, before it is
wrapped for data parallelism. Every model of the registry names its classifier ``fc``.

Frozen means frozen in every respect: no gradient (so no weight decay or momentum moves the features), and every
module outside the classifier runs in evaluation mode even while the loop trains (BatchNorm uses and keeps its
first-stage running statistics, dropout is off), as the reference code does with the feature network in eval mode.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rwray.errors import ConfigError


def classifier_of(model: nn.Module) -> nn.Module:
    head = getattr(model, "fc", None)
    if not isinstance(head, nn.Module):
        raise ConfigError([f"train.trainable / reinit_classifier: {type(model).__name__} has no classifier `fc`"])
    return head


def load_first_stage(model: nn.Module, state: dict, where: Path) -> None:
    """Load a first-stage checkpoint's model weights, refusing another architecture or class count with the
    differing entries named."""
    try:
        model.load_state_dict(state["model"], strict=True)
    except (RuntimeError, KeyError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:4] or [f"{type(e).__name__}: {e}"]
        raise ConfigError([f"train.init_from: {where} holds another model than this job's "
                           f"({'; '.join(lines)[:400]}). Fix: point it at a checkpoint of the same model and data "
                           f"(the first stage's model: and data: sections)"]) from None


def freeze_features(model: nn.Module) -> None:
    """No gradient and evaluation mode for everything but the classifier: a forward pre-hook puts each frozen
    module back in eval mode, whatever model.train() set."""
    head = classifier_of(model)
    trainable = {id(m) for m in head.modules()}
    for module in model.modules():
        if id(module) in trainable:
            continue
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
        if module is not model:  # the model's own flag stays what the loop sets; its parts decide their behaviour
            module.register_forward_pre_hook(_eval_mode)


def _eval_mode(module: nn.Module, args) -> None:
    module.training = False


class ScaledHead(nn.Module):
    """LWS (learnable weight scaling): the frozen classifier's logits times a learned per-class scale [K], from 1:
    logits_k = s_k · (w_kᵀx + b_k), i.e. the classifier's weight vectors rescaled."""

    def __init__(self, head: nn.Module, num_classes: int):
        super().__init__()
        self.head = head
        self.scale = nn.Parameter(torch.ones(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B, K]
        return self.head(x) * self.scale


def prepare_stage(model: nn.Module, num_classes: int, init_from: Path | None, trainable: str,
                  reinit_classifier: bool, state: dict | None = None) -> nn.Module:
    """The job's second-stage settings applied to a freshly built model (``state``: the checkpoint, when the
    caller has read it already)."""
    if init_from is not None:
        from rwray.train import checkpoint

        load_first_stage(model, state if state is not None else checkpoint.load(init_from), init_from)
    if reinit_classifier:
        for m in classifier_of(model).modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    if trainable in ("classifier", "scales"):
        freeze_features(model)
    if trainable == "scales":
        head = classifier_of(model)
        for p in head.parameters():
            p.requires_grad_(False)
        model.fc = ScaledHead(head, num_classes)
    return model


