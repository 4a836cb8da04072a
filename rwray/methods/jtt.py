"""JTT, Just Train Twice (Liu et al., ICML 2021): an identification stage of plain ERM, then every training sample
the stage-1 model got wrong is up-weighted by λ_up.

    epochs 0 … T−1:  w_i = 1 (ERM); during epoch T−1 each sample's prediction is recorded as it is trained on
    at epoch T:      the error set E = {i : argmax logits_i ≠ y_i in epoch T−1}, gathered from every worker
    epochs ≥ T:      w_i = λ_up for i ∈ E, 1 otherwise

Our weights are relative to ERM (the loop takes the batch mean of w_i·ℓ_i), which is the paper's upsampling of E
by λ_up in expectation.

Two deviations from the paper, both to keep JTT one run and one method: the errors are those of the training
steps of epoch T−1 (train mode, with augmentation), not of a separate evaluation pass after it; and the second
stage continues from the identification model instead of training a new one from scratch (set identify_epochs
small, as the paper's T is, e.g. 1 to 60 epochs).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from rwray import dist
from rwray.datainfo import DataInfo
from rwray.losses import LOSSES, LossConfig
from rwray.losses.ce import CEParams
from rwray.methods.base import Method, StepInputs, StepOutput
from rwray.registry import Params


class JTTParams(Params):
    name: Literal["jtt"] = "jtt"
    loss: LossConfig = CEParams()
    identify_epochs: int = Field(1, ge=1, description="T: epochs of ERM before the error set is taken")
    lam_up: float = Field(6.0, gt=0, description="weight of a sample the identification model got wrong")


def jtt_weights(index: torch.Tensor, error_set: torch.Tensor, lam_up: float, dtype: torch.dtype) -> torch.Tensor:
    """[B] sample ids, [E] sorted ids of the error set -> [B] weights: λ_up for members, 1 otherwise."""
    if error_set.numel() == 0:
        return torch.ones(index.shape, dtype=dtype, device=index.device)
    pos = torch.searchsorted(error_set, index).clamp(max=error_set.numel() - 1)  # [B]
    member = (error_set[pos] == index).to(dtype)  # [B] 1 for members of E
    return 1 + (lam_up - 1) * member


class JTT(Method):
    def __init__(self, params: JTTParams, info: DataInfo):
        super().__init__(params, info)
        self.loss = LOSSES.build(params.loss, info)
        self.epoch = 0
        self.error_set = torch.zeros(0, dtype=torch.int64)  # [E] sorted sample ids
        self._wrong: list[torch.Tensor] = []  # this worker's misclassified ids in the identification's last epoch
        self._device = torch.device("cpu")  # the data's: collectives run there (NCCL needs GPU tensors)

    def begin_epoch(self, epoch: int) -> None:
        self.loss.begin_epoch(epoch)
        self.epoch = epoch
        self._wrong = []

    def step(self, inputs: StepInputs) -> StepOutput:
        losses = self.loss(inputs.logits, inputs.y)  # [B] with graph
        self._device = inputs.index.device
        if self.epoch == self.params.identify_epochs - 1:
            wrong = inputs.logits.detach().argmax(1) != inputs.y  # [B]
            self._wrong.append(inputs.index[wrong])
        if self.epoch < self.params.identify_epochs:
            weights = torch.ones_like(losses).detach()
        else:
            self.error_set = self.error_set.to(inputs.index.device)
            weights = jtt_weights(inputs.index, self.error_set, self.params.lam_up, losses.dtype)
        return StepOutput(losses=losses, weights=weights)

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """At the end of the identification stage, every worker's errors become one error set (collective)."""
        if epoch < self.params.identify_epochs - 1:
            return {}
        if epoch == self.params.identify_epochs - 1:
            mine = torch.cat(self._wrong) if self._wrong else torch.zeros(0, dtype=torch.int64, device=self._device)
            self.error_set = torch.unique(dist.all_gather_cat(mine))  # sorted, each id once
            self._wrong = []
        return {"jtt/error_set_size": float(self.error_set.numel())}

    def state_dict(self) -> dict[str, Any]:
        return {"error_set": self.error_set.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.error_set = state["error_set"].to(torch.int64)
