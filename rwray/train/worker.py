"""What one Ray Train worker trains, built the same way on every rank: the model (prepared for data parallelism),
the method, optimizer, schedule, EMA and loss scaler, and where the run stands (epoch, best epoch, history)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rwray import dist
from rwray.config import Config
from rwray.data import Manifest
from rwray.datainfo import DataInfo
from rwray.methods import METHODS, Method
from rwray.models import MODELS, sync_bn
from rwray.optim import build_optimizer, build_scheduler
from rwray.train.compiling import compile_model
from rwray.train.decoupled import classifier_of, prepare_stage
from rwray.train.epoch import grad_scaler, weight_ema


@dataclass
class Worker:
    """What one worker trains, built the same way on every rank, and where it stands."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    manifest: Manifest
    info: DataInfo
    model: nn.Module
    method: Method
    opt: torch.optim.Optimizer
    sched: Any
    ema: nn.Module | None = None  # train.ema_decay: the weights' moving average, evaluated and selected on
    scaler: torch.amp.GradScaler | None = None  # train.amp=fp16: the loss scale, carried from epoch to epoch
    start_epoch: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"score": float("-inf"), "epoch": -1, "confusions": {}})
    history: dict[int, dict[str, Any]] = field(default_factory=dict)  # epoch -> {"ts": ms, "metrics": {...}}
    logged: int = -1  # the last epoch whose metrics went to MLflow
    position: dict[str, Any] | None = None  # a mid-epoch checkpoint's {"epoch", "stages", "totals"}: resume there
    label: str = ""  # starts this run's terminal lines when several runs share the terminal (a sweep's trials)


def build(cfg: Config) -> Worker:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    manifest = Manifest.load(cfg.data.dir)
    info = manifest.data_info(cfg.data.crop_size)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = prepare_stage(MODELS.build(cfg.model, info), info.num_classes, cfg.train.init_from,
                          cfg.train.trainable, cfg.train.reinit_classifier, tau_norm=cfg.train.tau_norm,
                          frozen_mode=cfg.train.frozen_mode)
    if getattr(cfg.model, "sync_bn", False):
        model = sync_bn.convert(model, device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    method: Method = METHODS.build(cfg.method, info)
    method.attach(model, ray.train.torch.prepare_model, device)
    if cfg.train.compile:
        model = compile_model(model, cfg.method.name, method.supports_compile, cfg.train.compile_backend, device)
    opt = build_optimizer(cfg.optim, model.parameters(), classifier_of(dist.unwrap(model)).parameters()
                          if cfg.optim.classifier_lr is not None else ())
    sched = build_scheduler(cfg.schedule, opt, cfg.train.epochs)
    ema = weight_ema(model, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
    return Worker(cfg, ctx.get_world_rank(), ctx.get_world_size(), device, manifest, info, model, method, opt, sched,
                  ema, grad_scaler(device, cfg.train.amp))
