"""ERM: every sample counts the same. The baseline every reweighting method is measured against."""

from __future__ import annotations

from typing import Literal

import torch

from rwray.datainfo import DataInfo
from rwray.losses import LOSSES, LossConfig
from rwray.losses.ce import CEParams
from rwray.methods.base import Method, StepInputs, StepOutput, sample_losses
from rwray.registry import Params


class ERMParams(Params):
    name: Literal["erm"] = "erm"
    loss: LossConfig = CEParams()


class ERM(Method):
    supports_mix = True

    def __init__(self, params: ERMParams, info: DataInfo):
        super().__init__(params, info)
        self.loss = LOSSES.build(params.loss, info)

    def begin_epoch(self, epoch: int) -> None:
        self.loss.begin_epoch(epoch)

    def step(self, inputs: StepInputs) -> StepOutput:
        losses = sample_losses(self.loss, inputs)  # [B]
        return StepOutput(losses=losses, weights=torch.ones_like(losses).detach())
