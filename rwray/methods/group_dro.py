"""GroupDRO (Sagawa et al., "Distributionally Robust Neural Networks for Group Shifts", ICLR 2020).

Minimise the worst expected loss over G groups with the online algorithm: the group weights q (a distribution over
groups, uniform at the start) follow exponentiated gradient ascent on the groups' losses, and the model descends
the q-weighted loss:

    ℓ_g = mean loss of group g in the batch        (groups absent from the batch: ℓ_g = 0)
    q_g ← q_g · exp(η · ℓ_g),  q ← q / Σ q
    loss = Σ_g q_g · ℓ_g

Our weights are relative to ERM (the loop takes the batch mean of w_i·ℓ_i), so w_i = B · q_{g_i} / n_{g_i}, with B
and the group counts n_g taken over the GLOBAL batch (all-reduced, `rwray.dist`), as are the group losses: q is
the same on every worker and N workers × B samples update it as 1 worker × N·B does.

Groups (``group``): ``class`` (the label), or an extra shard column of small non-negative integers (``bias`` of the
colour-biased data, ``location``...), optionally crossed with the class (``cross_class``: G = K × num_groups
cells, as Sagawa's (label, attribute) groups). A group id outside [0, G) is bad data, reported with the column.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from rwray import dist
from rwray.datainfo import DataInfo
from rwray.errors import DataError
from rwray.losses import LOSSES, LossConfig
from rwray.losses.ce import CEParams
from rwray.methods.base import Method, StepInputs, StepOutput
from rwray.registry import Params


class GroupDROParams(Params):
    name: Literal["group_dro"] = "group_dro"
    loss: LossConfig = CEParams()
    group: str = Field("class", description="'class', or the name of an integer extra shard column")
    num_groups: int | None = Field(None, ge=1, description="values of the group column (ids 0..num_groups-1)")
    cross_class: bool = Field(False, description="groups are (class, column value) cells: G = K x num_groups")
    eta: float = Field(0.01, gt=0, description="step size of the group weights' exponentiated ascent")

    @model_validator(mode="after")
    def _column_needs_its_size(self) -> "GroupDROParams":
        if self.group != "class" and self.num_groups is None:
            raise ValueError(f"group_dro: group={self.group!r} is a shard column: set num_groups (its values are "
                             f"0..num_groups-1)")
        if self.group == "class" and self.cross_class:
            raise ValueError("group_dro: cross_class crosses a column with the class; group='class' has no column")
        return self


def group_dro_weights(losses: torch.Tensor, groups: torch.Tensor, q: torch.Tensor, eta: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One GroupDRO step: ([B] per-sample losses, [B] group ids, [G] q) -> ([B] weights relative to ERM, [G] new
    q, [G] global group losses (0 where absent)). Pure; collective when a process group runs (every worker calls)."""
    n_groups = q.numel()
    z = losses.detach().to(torch.float64)
    sums = torch.zeros(n_groups, dtype=torch.float64, device=z.device).index_add_(0, groups, z)  # [G]
    counts = torch.zeros(n_groups, dtype=torch.float64, device=z.device).index_add_(
        0, groups, torch.ones_like(z))  # [G]
    sums, counts = dist.all_reduce_sum(torch.stack([sums, counts])).unbind()  # global over workers
    group_loss = sums / counts.clamp(min=1)  # [G], 0 for absent groups
    new_q = q.to(device=z.device, dtype=torch.float64) * torch.exp(eta * group_loss)
    new_q = new_q / new_q.sum()
    batch = counts.sum()  # global B
    w = batch * new_q[groups] / counts[groups]  # [B]: B · q_g / n_g
    return w.to(losses.dtype), new_q, group_loss


class GroupDRO(Method):
    def __init__(self, params: GroupDROParams, info: DataInfo):
        super().__init__(params, info)
        if params.group != "class" and params.group not in info.extra_columns:
            raise DataError(f"group_dro: group column {params.group!r} is not in the data (its extra columns: "
                            f"{', '.join(info.extra_columns) or 'none'})")
        self.loss = LOSSES.build(params.loss, info)
        k = info.num_classes
        self.num_groups = k if params.group == "class" else params.num_groups * (k if params.cross_class else 1)
        self.q = torch.full((self.num_groups,), 1.0 / self.num_groups, dtype=torch.float64)  # [G]

    def group_ids(self, inputs: StepInputs) -> torch.Tensor:
        p = self.params
        if p.group == "class":
            return inputs.y
        col = inputs.extras[p.group].long()  # [B]
        if len(col) and (int(col.min()) < 0 or int(col.max()) >= p.num_groups):
            raise DataError(f"group_dro: column {p.group!r} holds {int(col.min())}..{int(col.max())}, outside "
                            f"0..{p.num_groups - 1} (num_groups={p.num_groups})")
        return inputs.y * p.num_groups + col if p.cross_class else col

    def begin_epoch(self, epoch: int) -> None:
        self.loss.begin_epoch(epoch)

    def step(self, inputs: StepInputs) -> StepOutput:
        losses = self.loss(inputs.logits, inputs.y)  # [B] with graph
        groups = self.group_ids(inputs)
        weights, self.q, group_loss = group_dro_weights(losses, groups, self.q, self.params.eta)
        worst, q_max = torch.stack([group_loss.max(), self.q.max()]).tolist()  # one host read
        return StepOutput(losses=losses, weights=weights.detach(),
                          metrics={"gdro/worst_group_loss": worst, "gdro/q_max": q_max})

    def end_epoch(self, epoch: int) -> dict[str, float]:
        return {f"gdro/q_{g}": v for g, v in enumerate(self.q.cpu().tolist())} if self.num_groups <= 64 else {}

    def state_dict(self) -> dict[str, Any]:
        return {"q": self.q.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q = state["q"].to(torch.float64)
