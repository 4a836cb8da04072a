"""Optimisers and learning-rate schedules, stepped once per epoch as in the LDAM/ABSGD recipes: the job's `optim`
and `schedule` sections, and what builds from them.

The settings live here, not in rwray/config.py, so that methods with optimizers of their own (ReBias's g) build
them with the same code without importing the job schema (which imports the methods).
"""

from __future__ import annotations

import math
from typing import Iterable, Literal, Sequence

import torch
from pydantic import Field, model_validator

from rwray.registry import Params


class OptimConfig(Params):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    nesterov: bool = False
    weight_decay: float = Field(2e-4, ge=0)
    # The classifier (`fc`) at its own learning rate, the rest of the model at `lr`; both follow the schedule
    # (e.g. fine-tuning a pretrained backbone at 0.001 under a fresh head at 0.1). None: one lr for everything.
    classifier_lr: float | None = Field(None, gt=0)


class ScheduleConfig(Params):
    name: Literal["step", "cosine", "constant"] = "step"
    warmup_epochs: int = Field(0, ge=0)  # linear warm-up from lr/warmup_epochs to lr (LDAM/ABSGD recipe: 5)
    milestones: list[int] = []  # step: multiply lr by gamma at each of these epochs
    gamma: float = Field(0.1, gt=0, le=1)
    min_lr: float = Field(0.0, ge=0)  # cosine floor
    # Step the schedule at the start of each epoch, before it trains, as Balanced Meta-Softmax's loop does: epoch e
    # (0-based) trains at the factor the default gives epoch e + 1, so a cosine's last epoch runs at its floor.
    step_first: bool = False
    # Epochs before the schedule starts, in which the model is not trained (LearnedMixin's g-only pre-training,
    # method.g_pretrain: first): epoch e follows the schedule's epoch e - delay_epochs, over train.epochs -
    # delay_epochs, so the model's own epochs see the whole schedule (milestones count from its first epoch).
    delay_epochs: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _sorted(self) -> "ScheduleConfig":
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError("milestones must be strictly increasing")
        return self


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter],
                    classifier: Iterable[torch.nn.Parameter] = ()) -> torch.optim.Optimizer:
    """The optimizer over the trainable ``params``; with cfg.classifier_lr, those among ``classifier`` form a second
    group at that lr (a group left empty, the whole model frozen but the head, is dropped)."""
    params = [p for p in params if p.requires_grad]
    if cfg.classifier_lr is not None:
        head = {id(p) for p in classifier}
        groups = [{"params": [p for p in params if id(p) not in head]},
                  {"params": [p for p in params if id(p) in head], "lr": cfg.classifier_lr}]
        params = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def step_factor(milestones: Sequence[int], gamma: float, epoch: int) -> float:
    """Step decay: gamma ** (number of milestones reached by `epoch`, 0-based)."""
    return gamma ** sum(epoch >= m for m in milestones)


def lr_factor(cfg: ScheduleConfig, epoch: int, total_epochs: int) -> float:
    """Multiplier of the base lr during `epoch` (0-based): linear warm-up, then step decay or cosine."""
    epoch = max(epoch - cfg.delay_epochs, 0) + int(cfg.step_first)
    total_epochs = max(total_epochs - cfg.delay_epochs, 1)
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / cfg.warmup_epochs
    if cfg.name == "step":
        return step_factor(cfg.milestones, cfg.gamma, epoch)
    if cfg.name == "cosine":
        span = max(1, total_epochs - cfg.warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
    return 1.0


def build_scheduler(cfg: ScheduleConfig, opt: torch.optim.Optimizer, total_epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Every parameter group follows the same schedule from its own lr; a cosine floor (min_lr) is the same
    absolute lr for each group."""
    def factor(base: float):
        floor = cfg.min_lr / base if cfg.name == "cosine" else 0.0
        return lambda e: floor + (1 - floor) * lr_factor(cfg, e, total_epochs)

    return torch.optim.lr_scheduler.LambdaLR(opt, [factor(g["lr"]) for g in opt.param_groups])
