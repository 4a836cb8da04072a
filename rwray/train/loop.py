"""The training loop every Ray Train worker runs, top to bottom. It knows no method by name.

Ray appears in five visible places: get_context, get_dataset_shard, prepare_model, get_checkpoint, report.
The epoch and evaluation bodies (`rwray.train.epoch`) are plain torch functions over iterables of batches, so
benchmarks run the same code in a plain process.

Restarts (a lost worker, a preempted driver) replay exactly: the data order of an epoch is a function of
(seed, epoch) alone (`rwray.train.batches.epoch_order`), augmentation and dropout of (seed, rank, epoch), and the
checkpoint holds the model, optimizer, scheduler, method state and every logged epoch's metrics. An epoch's metrics
are logged once, after its checkpoint is reported; a restart skips what the restored checkpoint covers.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from rwray import dist
from rwray.config import Config
from rwray.data import Manifest
from rwray.datainfo import DataInfo
from rwray.methods import METHODS, Method
from rwray.metrics import (
    BEST_EPOCH,
    EPOCH_S,
    SAMPLES_PER_S,
    TRAIN_LOSS,
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
from rwray.train import checkpoint
from rwray.train.batches import Batch, Images, TrainRows, epoch_seed
from rwray.train.epoch import evaluate, train_epoch
from rwray.train.rayenv import quiet_data


def train_loop_per_worker(job: dict[str, Any]) -> None:
    import ray.train

    quiet_data()
    w = build(Config.model_validate(job["config"]))
    restore(w, ray.train.get_checkpoint())
    log = open_log(job, w)
    status = _status_writer(job.get("status_dir"), w.rank, w.start_epoch)
    data = Data(w)
    for epoch in range(w.start_epoch, w.cfg.train.epochs):
        metrics, improved = run_epoch(w, data, epoch, status)
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
    start_epoch: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"score": float("-inf"), "epoch": -1, "cms": {}})
    history: dict[int, dict[str, Any]] = field(default_factory=dict)  # epoch -> {"ts": ms, "metrics": {...}}


def build(cfg: Config) -> Worker:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    manifest = Manifest.load(cfg.data.dir)
    info = manifest.data_info()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = ray.train.torch.prepare_model(MODELS.build(cfg.model, info))
    method: Method = METHODS.build(cfg.method, info)
    method.attach(model, ray.train.torch.prepare_model, device)
    opt = build_optimizer(cfg.optim, model.parameters())
    sched = build_scheduler(cfg.schedule, opt, cfg.train.epochs)
    return Worker(cfg, ctx.get_world_rank(), ctx.get_world_size(), device, manifest, info, model, method, opt, sched)


def checkpoint_state(w: Worker, epoch: int) -> dict[str, Any]:
    return {"model": dist.unwrap(w.model).state_dict(), "optimizer": w.opt.state_dict(),
            "scheduler": w.sched.state_dict(), "method": w.method.state_dict(), "epoch": epoch, "best": w.best,
            "history": w.history}


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
    w.start_epoch, w.best = state["epoch"] + 1, state["best"]
    if same_run is not None:
        w.history = {int(e): h for e, h in state.get("history", {}).items()}


def open_log(job: dict[str, Any], w: Worker) -> BufferedRunLogger | None:
    """Rank 0's logger (None elsewhere). A worker that died between reporting a checkpoint and sending its metrics
    left a gap: fill it from the checkpoint (same timestamps, so a copy that did arrive is not duplicated). Logged
    epochs are skipped."""
    if w.rank != 0:
        return None
    log = BufferedRunLogger(job["tracking_uri"], job["run_id"], job["spool_dir"])
    for e in sorted(w.history):
        log.log_epoch(e, w.history[e]["metrics"], w.history[e]["ts"])
    return log


# -------------------------------------------------------------------------------------------------------- the data


class Data:
    """This worker's batches: its rows of the train split's (seed, epoch) order, and its share of an eval split."""

    def __init__(self, w: Worker):
        import ray.train

        self.w = w
        self.images = Images(w.info, w.manifest.mean, w.manifest.std, w.device)
        self.num_bias = w.info.num_classes if "bias" in w.info.extra_columns else None  # bias values index classes
        self.gen = torch.Generator(device=w.device)
        self.train_rows = TrainRows(lambda: ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=4096, prefetch_batches=2))

    def train(self, epoch: int) -> Iterator[Batch]:
        cfg, w = self.w.cfg, self.w
        self.gen.manual_seed(epoch_seed(cfg.train.seed, w.rank, epoch))
        for rows in self.train_rows.batches(cfg.train.seed, epoch, w.rank, w.world, cfg.data.batch_size):
            yield self.images(rows, cfg.data.augment, cfg.data.crop_padding, self.gen)

    def eval(self, split: str) -> Iterator[Batch]:
        import ray.train

        # Eval splits are not split by Ray (its equal split drops rows): every worker reads the split and keeps
        # the rows with index % world == rank, so each sample is scored exactly once.
        w = self.w
        for rows in ray.train.get_dataset_shard(split).iter_torch_batches(batch_size=w.cfg.data.eval_batch_size):
            mine = rows["index"] % w.world == w.rank
            yield self.images({k: v[mine] for k, v in rows.items()})


# ------------------------------------------------------------------------------------------------------- one epoch


def run_epoch(w: Worker, data: Data, epoch: int, status: Callable[[int, int], None]
              ) -> tuple[dict[str, float], bool]:
    """Train one epoch, evaluate every eval split, update the best epoch. -> (metrics, whether it improved)."""
    cfg = w.cfg
    t0 = time.perf_counter()
    torch.manual_seed(epoch_seed(cfg.train.seed, w.rank, epoch))
    w.method.begin_epoch(epoch)
    status(epoch, -1)
    metrics = train_epoch(w.model, w.method, w.opt, data.train(epoch), epoch, cfg.train.grad_accum, cfg.train.amp,
                          on_step=lambda step: status(epoch, step))
    metrics[TRAIN_LR] = w.opt.param_groups[0]["lr"]
    w.sched.step()
    metrics.update(w.method.end_epoch(epoch))
    cms = {}
    for split in w.manifest.eval_splits:
        cm, cells = evaluate(w.model, data.eval(split), w.info.num_classes, cfg.train.amp, data.num_bias)
        cms[split] = cm = cm.cpu()
        metrics.update(split_metrics(split, cm, cells, w.info.class_counts))
    metrics[EPOCH_S] = time.perf_counter() - t0
    metrics[SAMPLES_PER_S] = metrics[TRAIN_SAMPLES] / metrics[EPOCH_S]
    return metrics, select_best(w, epoch, metrics, cms)


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


def report_epoch(w: Worker, epoch: int, metrics: dict[str, float], improved: bool,
                 log: BufferedRunLogger | None) -> None:
    """Report the epoch's checkpoint (rank 0 writes it) to Ray Train, then log its metrics."""
    import ray.train

    w.history[epoch] = {"ts": int(time.time() * 1000), "metrics": dict(metrics)}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if w.rank == 0:
            checkpoint.save(tmp, checkpoint_state(w, epoch), w.cfg.to_yaml())
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)
        if log is not None:
            # Only now: a restart resumes after this epoch, so it will not run (and log) it again.
            log.log_epoch(epoch, metrics, w.history[epoch]["ts"])
            if improved:
                log.artifact(Path(tmp) / checkpoint.STATE, "checkpoints/best")
            print(progress_line(epoch, w.cfg.train.epochs, metrics, w.cfg.train.select_metric), flush=True)


# -------------------------------------------------------------------------------------------------------- progress


def progress_line(epoch: int, epochs: int, m: dict[str, float], select: str) -> str:
    return (f"epoch {epoch + 1:>3}/{epochs}  loss {m[TRAIN_LOSS]:.4f}  lr {m[TRAIN_LR]:.4g}  "
            f"val bal-acc {100 * m[split_key('val', 'balanced_acc')]:5.1f}  "
            f"test bal-acc {100 * m[split_key('test', 'balanced_acc')]:5.1f}  "
            f"best {select}={100 * m[best_key(select)]:.1f} @ {int(m[BEST_EPOCH]) + 1}  "
            f"{m[SAMPLES_PER_S]:.0f} samples/s")


def _status_writer(folder: str | None, rank: int, start_epoch: int) -> Callable[[int, int], None]:
    """Progress as <folder>/rank<r>.json {pid, rank, start_epoch, epoch, step}: lets an operator (or a
    fault-injection test) find which process runs which rank, where it resumed and where it is. Off unless the
    driver had RWRAY_WORKER_STATUS_DIR set."""
    if not folder:
        return lambda epoch, step: None
    path = Path(folder) / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(epoch: int, step: int) -> None:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "rank": rank, "start_epoch": start_epoch, "epoch": epoch,
                                   "step": step}))
        os.replace(tmp, path)

    return write


# --------------------------------------------------------------------------------------------- the run's artifacts


def log_final_artifacts(log: BufferedRunLogger, w: Worker) -> None:
    """The last weights, and the test split's confusion matrix and per-class accuracy at the best epoch."""
    from rwray import plots  # matplotlib: imported by the worker that draws, not by every driver

    best, classes, info = w.best, w.manifest.classes, w.info
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(dist.unwrap(w.model).state_dict(), tmp / "model.pt")
        log.artifact(tmp / "model.pt", "checkpoints/last")
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
