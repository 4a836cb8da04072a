"""Decoupled training's second stage (Kang et al., "Decoupling Representation and Classifier for Long-Tailed
Recognition", ICLR 2020): the representation of a first-stage model is kept and only the classifier is trained
again, usually re-initialised and on class-balanced batches (cRT), or only rescaled per class (LWS), or not trained
at all: τ-normalised (`tau_normalize`), then evaluated.

`prepare_stage` applies train.init_from / trainable / reinit_classifier / tau_norm to a freshly built model, before
it is wrapped for data parallelism. Every model of the registry names its classifier ``fc``.

Frozen features get no gradient (so no weight decay or momentum moves their weights). How they run while the loop
trains is `train.frozen_mode`:
* eval (default): every module outside the classifier stays in evaluation mode, so BatchNorm uses and keeps the
  first stage's running statistics and dropout is off: the representation is exactly the first stage's.
* train: only the gradients are off. This is what the Balanced Meta-Softmax and classifier-balancing code does (its
  loop calls train() on every network each epoch; `fix: true` only turns off requires_grad), so BatchNorm normalises
  each batch with its own statistics and its running statistics drift towards the second stage's batches (e.g.
  class-balanced ones under cRT); evaluation then uses the drifted statistics.
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


def freeze_features(model: nn.Module, mode: str = "eval") -> None:
    """No gradient for everything but the classifier; with mode "eval", evaluation mode too: a forward pre-hook puts
    each frozen module back in eval mode, whatever model.train() set ("train" leaves the loop's train() in force)."""
    head = classifier_of(model)
    trainable = {id(m) for m in head.modules()}
    for module in model.modules():
        if id(module) in trainable:
            continue
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
        if mode == "eval" and module is not model:  # the model's own flag stays what the loop sets
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


def tau_normalize(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """τ-normalisation of a linear classifier's weight [K, D] -> [K, D]: each class row w_k / ‖w_k‖₂^τ.

    τ = 0 leaves the rows as they are, τ = 1 gives them unit norm, values between shrink the norm differences that
    instance-balanced training leaves between head and tail classes (Kang et al. 2020). A row of norm 0
    stays 0 (its norm is clamped to the smallest positive float instead of dividing 0 by 0)."""
    norms = weight.norm(p=2, dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)  # [K, 1]
    return weight / norms.pow(tau)


def apply_tau_norm(head: nn.Module, tau: float) -> None:
    """τ-normalise a first-stage classifier in place: weight [K, D] as `tau_normalize`, and the bias [K] set to 0.

    The bias is dropped because the reference drops it: classifier-balancing's tau_norm.py loads fc.weight and
    fc.bias but scores logits = x · ŵ_kᵀ with the normalised weights alone. The bias was learned on the long-tailed
    data too, so it carries the same head-class prior as the weight norms, and it has no row to normalise; keeping it
    would leave in part of the imbalance τ-norm removes. It is zeroed rather than removed so the checkpoint still
    loads into the job's own model (the same state-dict keys and shapes as the first stage). So τ = 0 is the first
    stage's classifier without its bias, as in the reference, not the first-stage model unchanged."""
    if not isinstance(head, nn.Linear):  # NormedLinear (cosine head) normalises its weights in forward already
        raise ConfigError([f"train.tau_norm: the model's classifier is a {type(head).__name__}, not a linear layer "
                           f"(model.normed_head: true is a cosine classifier whose class vectors are unit-norm in "
                           f"every forward, so τ-norm would change nothing). Fix: τ-normalise a first stage trained "
                           f"with the plain linear head (model.normed_head: false)"])
    with torch.no_grad():
        head.weight.copy_(tau_normalize(head.weight, tau))  # [K, D]
        if head.bias is not None:
            head.bias.zero_()  # [K]


def prepare_stage(model: nn.Module, num_classes: int, init_from: Path | None, trainable: str,
                  reinit_classifier: bool, state: dict | None = None, tau_norm: float | None = None,
                  frozen_mode: str = "eval") -> nn.Module:
    """The job's second-stage settings applied to a freshly built model (``state``: the checkpoint, when the
    caller has read it already).

    trainable=none (with tau_norm) trains nothing because its run takes no step (`rwray.train.loop`,
    evaluation-only); its parameters keep requires_grad, so the optimizer and DDP wrapper are built as for any run."""
    if init_from is not None:
        from rwray.train import checkpoint

        load_first_stage(model, state if state is not None else checkpoint.load(init_from), init_from)
    if tau_norm is not None:
        apply_tau_norm(classifier_of(model), tau_norm)
    if reinit_classifier:
        for m in classifier_of(model).modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    if trainable in ("classifier", "scales"):
        freeze_features(model, frozen_mode)
    if trainable == "scales":
        head = classifier_of(model)
        for p in head.parameters():
            p.requires_grad_(False)
        model.fc = ScaledHead(head, num_classes)
    return model


