"""The training loop every Ray Train worker runs, top to bottom. It knows no method by name.

Ray appears in four visible places: get_context, prepare_model, get_checkpoint, report (and, for the input,
get / get_dataset_shard in `rwray.train.inputs`).
The epoch and evaluation bodies (`rwray.train.epoch`) are plain torch functions over iterables of batches, so
benchmarks run the same code in a plain process.

Restarts (a lost worker, a preempted driver) replay exactly: the data order of an epoch is a function of
(seed, epoch) alone (`rwray.train.batches.epoch_order`), augmentation and dropout of (seed, rank, epoch), and the
checkpoint holds the model, optimizer, scheduler, method state and every logged epoch's metrics. An epoch's metrics
are logged once, after its checkpoint is reported; a restart skips what the restored checkpoint covers.

An evaluation-only run (train.trainable=none: τ-norm, `rwray.train.decoupled`) has one epoch, `evaluate_only`: the
prepared model scored on the eval splits, with no step and no train batch, then reported like any epoch.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rwray import dist, output
from rwray.config import Config
from rwray.data import Manifest
from rwray.datainfo import DataInfo
from rwray.methods import METHODS, Method
from rwray.metrics import (
    BEST_EPOCH,
    EPOCH_S,
    SAMPLES_PER_S,
    TRAIN_CLASS_SAMPLES,
    TRAIN_LR,
    TRAIN_SAMPLES,
    best_key,
    per_class_accuracy,
    split_key,
    split_metrics,
    summarize,
)
from rwray.models import MODELS
from rwray.optim import build_optimizer, build_scheduler
from rwray.tracking import BufferedRunLogger
from rwray.tracking.system import node_metrics
from rwray.train import checkpoint
from rwray.train.batches import epoch_seed
from rwray.train.compiling import compile_model
from rwray.train.decoupled import classifier_of, prepare_stage
from rwray.train import plan
from rwray.train.epoch import EpochTotals, evaluate, grad_scaler, train_epoch, weight_ema
from rwray.train.progress import EpochTicker, progress_line, sample_trace, status_writer
from rwray.train.inputs import Data


def train_loop_per_worker(job: dict[str, Any]) -> None:
    import ray.train

    w = build(Config.model_validate(job["config"]))
    w.label = job.get("label", "")
    restore(w, ray.train.get_checkpoint())
    log = open_log(job, w)
    status = status_writer(job.get("status_dir"), w.rank, w.start_epoch)
    trace = sample_trace(job.get("trace_dir"), w.rank)
    data = Data(w.cfg, w.manifest, w.device, w.rank, w.world, job.get("tables", {}))
    ctx = ray.train.get_context()
    interval = w.cfg.tracking.system_metrics_s if ctx.get_local_rank() == 0 else 0  # one monitor a node
    with node_metrics(job["tracking_uri"], job["run_id"], ctx.get_node_rank(), interval):
        for epoch in range(w.start_epoch, w.cfg.train.epochs):
            metrics, improved = (evaluate_only(w, data, epoch) if w.cfg.train.trainable == "none"
                                 else run_epoch(w, data, epoch, status, trace))
            report_epoch(w, epoch, metrics, improved, log)
    if log is not None:
        log_final_artifacts(log, w)
        log.close(w.cfg.tracking.flush_timeout_s)


# ------------------------------------------------------------------------------------------------------ the worker


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
    best: dict[str, Any] = field(default_factory=lambda: {"score": float("-inf"), "epoch": -1, "cms": {}})
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
                          cfg.train.trainable, cfg.train.reinit_classifier, tau_norm=cfg.train.tau_norm)
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


def checkpoint_state(w: Worker, epoch: int) -> dict[str, Any]:
    return {"model": dist.unwrap(w.model).state_dict(), "optimizer": w.opt.state_dict(),
            "scheduler": w.sched.state_dict(), "method": w.method.state_dict(), "epoch": epoch, "best": w.best,
            "history": w.history, **({"ema": w.ema.state_dict()} if w.ema is not None else {}),
            **({"scaler": w.scaler.state_dict()} if w.scaler is not None else {})}


def restore(w: Worker, same_run) -> None:
    """Ray's own checkpoint (a restarted worker group, or a restarted driver reusing the run's Ray folder) wins;
    otherwise the user's resume= (Train V2 leaves that to us), which starts a new MLflow run and so no history."""
    import ray.train

    resume = w.cfg.resume
    restored = same_run or (ray.train.Checkpoint.from_directory(str(resume)) if resume else None)
    if restored is None:
        return
    with restored.as_directory() as d:
        state = checkpoint.load(d)
    dist.unwrap(w.model).load_state_dict(state["model"])
    w.opt.load_state_dict(state["optimizer"])
    w.sched.load_state_dict(state["scheduler"])
    w.method.load_state_dict(state["method"])
    if w.ema is not None and "ema" in state:  # else the average starts again, from the restored weights
        w.ema.load_state_dict(state["ema"])
    if w.scaler is not None and "scaler" in state:
        w.scaler.load_state_dict(state["scaler"])
    w.start_epoch, w.best = state["epoch"] + 1, state["best"]
    position = state.get("position")
    if position is not None and position.get("plan") == plan.PLAN_VERSION:  # else the epoch starts again
        w.position = position
    if same_run is not None:
        w.history = {int(e): h for e, h in state.get("history", {}).items()}


def open_log(job: dict[str, Any], w: Worker) -> BufferedRunLogger | None:
    """Rank 0's logger (None elsewhere). A worker that died between reporting a checkpoint and sending its metrics
    left a gap: fill it from the checkpoint (same timestamps, so a copy that did arrive is not duplicated). Logged
    epochs are skipped."""
    if w.rank != 0:
        return None
    log = BufferedRunLogger(job["tracking_uri"], job["run_id"], job["spool_dir"])
    log_epochs(w, log)
    return log


def log_epochs(w: Worker, log: BufferedRunLogger) -> None:
    """Send the epochs a checkpoint covers and MLflow has not seen, with the timestamps they were first logged
    with (a copy that did arrive before a restart is not duplicated)."""
    for e in sorted(w.history):
        if e > w.logged:
            log.log_epoch(e, w.history[e]["metrics"], w.history[e]["ts"])
            w.logged = e


# ------------------------------------------------------------------------------------------------------- one epoch


def run_epoch(w: Worker, data: Data, epoch: int, status: Callable[[int, int], None],
              trace: Callable[[int, int, list[int]], None] | None = None) -> tuple[dict[str, float], bool]:
    """Train one epoch, evaluate every eval split, update the best epoch. -> (metrics, whether it improved)."""
    cfg = w.cfg
    t0 = time.perf_counter()
    at = w.position if w.position is not None and w.position["epoch"] == epoch else None  # resuming mid-epoch
    w.position = None
    stages = plan.resume_stages(at["stages"] if at else None, w.world)
    totals = EpochTotals.from_state(at["totals"] if at else None)
    if w.rank != 0:  # the checkpoint's sums are global (`report_position`): rank 0 carries them
        totals.loss_sum, totals.seen, totals.weight_sum, totals.method = 0.0, 0, 0.0, {}
    first = totals.steps
    torch.manual_seed(epoch_seed(cfg.train.seed, w.rank, epoch) + first)
    w.method.begin_epoch(epoch)
    status(epoch, -1)
    left, batches = data.train(epoch, stages, first)
    ids: list[list[int]] = []  # the batch in training (for the sample trace)

    def traced(batches):
        for b in batches:
            ids[:] = [b.index.tolist()]  # a host copy per step: only with RWRAY_SAMPLE_TRACE_DIR set
            yield b

    ticker = EpochTicker(epoch, first + left, cfg.data.batch_size * w.world)
    every = cfg.train.checkpoint_every_steps

    def on_step(step: int) -> None:
        status(epoch, step)
        if trace is not None:
            trace(epoch, step, ids[0])
        if w.rank == 0 and (line := ticker.step(step)) is not None:  # an epoch longer than ~30 s
            say(w, line)
        if every is not None and (step + 1) % every == 0 and step + 1 < first + left:
            done = stages[:-1] + [(stages[-1][0], stages[-1][1] + (step + 1 - first) * cfg.data.batch_size)]
            report_position(w, epoch, done, totals)

    metrics = train_epoch(w.model, w.method, w.opt, traced(batches) if trace is not None else batches, epoch, cfg.train.grad_accum, cfg.train.amp,
                          on_step=on_step, clip_grad_norm=cfg.train.clip_grad_norm, ema=w.ema, scaler=w.scaler,
                          totals=totals)
    metrics[TRAIN_LR] = w.opt.param_groups[0]["lr"]
    if len(w.opt.param_groups) > 1:  # optim.classifier_lr: the head's own
        metrics[TRAIN_LR + "_classifier"] = w.opt.param_groups[-1]["lr"]
    if cfg.data.sampler != "uniform":  # the class mix the sampler realised, over all workers
        counts = dist.all_reduce_sum(data.class_samples.to(w.device)).tolist()
        metrics.update({f"{TRAIN_CLASS_SAMPLES}{c}": float(n) for c, n in enumerate(counts)})
    w.sched.step()
    metrics.update(w.method.end_epoch(epoch))
    cms = evaluate_splits(w, data, metrics)
    metrics[EPOCH_S] = time.perf_counter() - t0
    metrics[SAMPLES_PER_S] = metrics[TRAIN_SAMPLES] / metrics[EPOCH_S]
    return metrics, select_best(w, epoch, metrics, cms)


def evaluate_only(w: Worker, data: Data, epoch: int) -> tuple[dict[str, float], bool]:
    """An evaluation-only run's one epoch (train.trainable=none: τ-norm): the prepared model scored on every eval
    split as it is — no optimizer step, no batch of the train split, so no train/* metrics. It is reported,
    checkpointed and selected like a trained epoch (epoch 0 of train.epochs=1), which is what sweeps and tables
    read."""
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    cms = evaluate_splits(w, data, metrics)
    metrics[EPOCH_S] = time.perf_counter() - t0
    return metrics, select_best(w, epoch, metrics, cms)


def evaluate_splits(w: Worker, data: Data, metrics: dict[str, float]) -> dict[str, torch.Tensor]:
    """Score every eval split, adding its metrics to ``metrics``. -> the confusion matrices [K, K] by split."""
    cms = {}
    if w.ema is not None:  # its BatchNorm statistics averaged each worker's own: score rank 0's (the checkpoint's)
        dist.broadcast_module_(w.ema)
    scored = w.ema if w.ema is not None else w.model  # what is evaluated, and so selected
    for split in w.manifest.eval_splits:
        counts = evaluate(scored, data.eval(split), w.info.num_classes, w.cfg.train.amp, data.num_bias,
                          data.cluster_columns, data.num_clusters)
        cms[split] = cm = counts.cm.cpu()
        metrics.update(split_metrics(split, cm, counts.cells, w.info.class_counts, counts.clusters))
    return cms


def select_best(w: Worker, epoch: int, metrics: dict[str, float], cms: dict[str, torch.Tensor]) -> bool:
    """Chosen on validation only (train.select_metric); every other split's numbers of that epoch are reported
    alongside, as best/<split>/<metric>. Adds the best/ keys to ``metrics``; -> whether this epoch is the best."""
    select = w.cfg.train.select_metric
    score = metrics.get(select, float("-inf"))
    improved = score > w.best["score"]
    if improved:
        w.best = {"score": score, "epoch": epoch, "cms": cms}
    metrics.update({BEST_EPOCH: w.best["epoch"], best_key(select): w.best["score"]})
    for split, cm in w.best["cms"].items():
        if split != "val":
            metrics.update({best_key(split_key(split, k)): v for k, v in summarize(cm, w.info.class_counts).items()})
    return improved


def report_position(w: Worker, epoch: int, stages: plan.Stages, totals: EpochTotals) -> None:
    """A mid-epoch checkpoint (train.checkpoint_every_steps): the state after the last finished epoch's fields,
    the weights and optimizer as they are now, and where the epoch stands — the rows each rank consumed
    (``stages``) and the epoch's sums so far (global: all-reduced here, carried by rank 0 on resume)."""
    import ray.train

    sums = dist.all_reduce_sum(torch.tensor([totals.loss_sum, float(totals.seen)], dtype=torch.float64,
                                            device=w.device)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if w.rank == 0:
            state = checkpoint_state(w, epoch - 1)
            state["position"] = {"epoch": epoch, "stages": [list(s) for s in stages], "plan": plan.PLAN_VERSION,
                                 "totals": {**totals.state_dict(), "loss_sum": sums[0], "seen": int(sums[1])}}
            checkpoint.save(tmp, state, w.cfg.to_yaml())
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"epoch": epoch, "step_in_epoch": totals.steps}, checkpoint=ckpt)


def report_epoch(w: Worker, epoch: int, metrics: dict[str, float], improved: bool,
                 log: BufferedRunLogger | None) -> None:
    """Report the epoch to Ray Train, with a checkpoint (rank 0 writes it) every train.checkpoint_every epochs and
    after the last; then log the metrics the checkpoint covers."""
    import ray.train

    cfg = w.cfg.train
    w.history[epoch] = {"ts": int(time.time() * 1000), "metrics": dict(metrics)}
    due = (epoch + 1) % cfg.checkpoint_every == 0 or epoch == cfg.epochs - 1
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if w.rank == 0 and (due or improved):  # the best epoch's state is logged even between checkpoints
            checkpoint.save(tmp, checkpoint_state(w, epoch), w.cfg.to_yaml())
            ckpt = ray.train.Checkpoint.from_directory(tmp) if due else None
        ray.train.report(metrics, checkpoint=ckpt)
        if log is not None:
            if due:  # only now: a restart resumes after this epoch, so it will not run (and log) these again
                log_epochs(w, log)
            if improved:
                log.artifact(Path(tmp) / checkpoint.STATE, "checkpoints/best")
            say(w, progress_line(epoch, cfg.epochs, metrics, cfg.select_metric))


# -------------------------------------------------------------------------------------------------------- progress


def say(w: Worker, line: str) -> None:
    output.worker_line(f"{w.label}  {line}" if w.label else line)


# --------------------------------------------------------------------------------------------- the run's artifacts


def log_final_artifacts(log: BufferedRunLogger, w: Worker) -> None:
    """The last weights, and the test split's confusion matrix and per-class accuracy at the best epoch."""
    from rwray import plots  # matplotlib: imported by the worker that draws, not by every driver

    best, classes, info = w.best, w.manifest.classes, w.info
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(dist.unwrap(w.model).state_dict(), tmp / "model.pt")
        log.artifact(tmp / "model.pt", "checkpoints/last")
        if w.ema is not None:  # the weights the metrics were measured on
            torch.save(w.ema.module.state_dict(), tmp / "model_ema.pt")
            log.artifact(tmp / "model_ema.pt", "checkpoints/last")
        cm = best["cms"]["test"]
        acc = per_class_accuracy(cm).nan_to_num(0).tolist()
        (tmp / "confusion_matrix.json").write_text(json.dumps({"classes": classes, "rows_true_cols_pred": cm.tolist(),
                                                                 "epoch": best["epoch"], "split": "test"}))
        plots.per_class_accuracy(acc, info.class_counts, classes,
                                 f"test accuracy per class (epoch {best['epoch'] + 1}, chosen on val)",
                                 tmp / "per_class_accuracy.png")
        plots.confusion_matrix(cm.numpy(), classes, "test confusion matrix (row-normalised)", tmp / "confusion_matrix.png")
        for name in ("confusion_matrix.json", "per_class_accuracy.png", "confusion_matrix.png"):
            log.artifact(tmp / name, "evaluation")
        for path in w.method.artifacts(str(tmp)):
            log.artifact(path, "method")
