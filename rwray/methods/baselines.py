"""The one-network baselines of ReBias's Biased-MNIST table: the target network f alone (`vanilla`) and the biased
network alone (`biased`), both plain CE training of the loop's model."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rwray import dist
from rwray.methods.base import Method, Prepare, StepInputs, StepOutput
from rwray.methods.two_network import cross_entropy
from rwray.models.simple_conv import SimpleConvNet
from rwray.registry import Params


class VanillaParams(Params):
    name: Literal["vanilla"] = "vanilla"


class BiasedParams(Params):
    name: Literal["biased"] = "biased"


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
        m = dist.unwrap(model)
        if isinstance(m, SimpleConvNet) and m.kernel != 1:
            raise ValueError(
                f"method 'biased' trains the biased network g, a SimpleConvNet with 1x1 kernels, but the model has "
                f"kernel={m.kernel}. Set model.kernel=1 in the job (or use method 'vanilla' for the target network)."
            )
