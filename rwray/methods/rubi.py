"""RUBi (Cadene et al., NeurIPS 2019) as a baseline of ReBias's Biased-MNIST table: f's logits are masked by the
sigmoid of a head fc on the biased network's features, so f gains nothing on the samples g already explains,

  g: CE(g)        f: CE(f_logits ⊙ sigmoid(fc(g_feat.detach())))        fc: that fused CE + w·CE(fc(g_feat))

g is trained on its own CE only (the bias encoder gets no fused gradient); fc by the exact split of the joint loss
described in rwray/methods/two_network.py.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from rwray import dist
from rwray.methods.base import Prepare, StepInputs, StepOutput
from rwray.methods.two_network import (AuxOptimParams, GModel, TwoNetMethod, cross_entropy, full_precision,
                                       g_default)
from rwray.registry import Params


class RUBiParams(Params):
    name: Literal["rubi"] = "rubi"
    question_loss_weight: float = Field(1.0, ge=0, description="weight of CE(fc(g_feat)) in the head's loss")
    n_g_updates: int = Field(1, ge=1)
    g: GModel = Field(default_factory=g_default)
    g_optim: AuxOptimParams = Field(default_factory=AuxOptimParams)


def rubi_objectives(f_logits: torch.Tensor, mask_logits: torch.Tensor, y: torch.Tensor,
                    question_loss_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, K] f's logits (graph into f), [B, K] fc's mask logits (graph into fc), [B] -> (f's losses [B], fc's loss []).

    The joint objective CE(f ⊙ sigmoid(m)) + w·CE(m), split: f's fused CE at the mask's values (detached), and fc's
    loss on f's detached logits, so each gets exactly its gradient of the joint objective.
    """
    mask = torch.sigmoid(mask_logits)  # [B, K]
    losses = cross_entropy(f_logits * mask.detach(), y)  # [B] f's fused CE at fc's pre-update values
    head_loss = cross_entropy(f_logits.detach() * mask, y).mean() + question_loss_weight * cross_entropy(
        mask_logits, y
    ).mean()
    return losses, head_loss


class RUBi(TwoNetMethod):
    tag = "rubi"

    def build_heads(self, model: nn.Module, prepare: Prepare, device: torch.device) -> None:
        # g_feat [B, Dg] -> mask logits [B, K]
        fc = nn.Linear(dist.unwrap(self.g).feature_dim, self.info.num_classes).to(device)
        self.heads["fc"] = prepare(fc)
        self.opts["heads"] = self.aux_optimizer(fc)

    def step(self, inputs: StepInputs) -> StepOutput:
        p = self.params
        for _ in range(p.n_g_updates):
            g_ce, _ = self.g_update(inputs)  # g: its own CE only
        g_logits, g_feat = self.g_eval(inputs)  # [B, K], [B, Dg] no graph: the bias encoder gets no fused gradient
        mask_logits = self.heads["fc"](g_feat)  # [B, K], graph into fc only
        f_logits = full_precision(inputs.logits)  # [B, K]
        losses, head_loss = rubi_objectives(f_logits, mask_logits, inputs.y, p.question_loss_weight)
        opt = self.opts["heads"]
        opt.zero_grad(set_to_none=True)
        head_loss.backward()
        opt.step()
        metrics = {"g_ce": g_ce, "g_acc": (g_logits.argmax(1) == inputs.y).double().mean(),
                   "mask_mean": torch.sigmoid(mask_logits.detach()).mean()}
        return StepOutput(losses=losses, weights=torch.ones_like(losses).detach(), metrics=self.scalars(self.tag, metrics))
