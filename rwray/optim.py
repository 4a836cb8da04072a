"""Optimisers and learning-rate schedules, stepped once per epoch as in the LDAM/ABSGD recipes."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from rwray.config import OptimConfig, ScheduleConfig


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: ScheduleConfig, epoch: int, total_epochs: int) -> float:
    """Multiplier of the base lr during `epoch` (0-based): linear warm-up, then step decay or cosine."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / cfg.warmup_epochs
    if cfg.name == "step":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.name == "cosine":
        span = max(1, total_epochs - cfg.warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
    return 1.0


def build_scheduler(cfg: ScheduleConfig, opt: torch.optim.Optimizer, total_epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    base = opt.param_groups[0]["lr"]
    if cfg.name == "cosine" and cfg.min_lr > 0:
        floor = cfg.min_lr / base
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: floor + (1 - floor) * lr_factor(cfg, e, total_epochs))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(cfg, e, total_epochs))
