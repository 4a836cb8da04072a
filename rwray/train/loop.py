"""The training loop every Ray Train worker runs, top to bottom. It knows no method by name.

Ray appears in a few visible places: get_context and get_checkpoint here, prepare_model where the worker is built
(`rwray.train.worker`), report where epochs and checkpoints are handed on (`rwray.train.reporting`), and, for the
input, get / get_dataset_shard in `rwray.train.inputs`.
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

import time
from typing import Any, Callable

import numpy as np
import torch

from rwray import dist
from rwray.config import Config
from rwray.metrics import (
    BEST_EPOCH,
    EPOCH_S,
    SAMPLES_PER_S,
    CLASS_METRICS_MAX,
    TRAIN_CLASS_SAMPLES,
    TRAIN_LR,
    TRAIN_SAMPLES,
    Confusion,
    best_key,
    class_columns,
    split_key,
    split_metrics,
    summarize,
)
from rwray.tracking.system import node_metrics
from rwray.train import plan
from rwray.train.batches import epoch_seed
from rwray.train.epoch import EpochTotals, evaluate, train_epoch
from rwray.train.inputs import Data
from rwray.train.progress import EpochTicker, sample_trace, status_writer
from rwray.train.reporting import (best_confusions, log_final_artifacts, open_log, report_epoch, report_position,
                                   restore, say)
from rwray.train.worker import Worker, build


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
            metrics, improved, classes = (evaluate_only(w, data, epoch, status) if w.cfg.train.trainable == "none"
                                          else run_epoch(w, data, epoch, status, trace))
            report_epoch(w, epoch, metrics, improved, log, classes)
    status(w.cfg.train.epochs, -1, "final artifacts")
    if log is not None:
        log_final_artifacts(log, w)
        log.close(w.cfg.tracking.flush_timeout_s)


# ------------------------------------------------------------------------------------------------------- one epoch


def run_epoch(w: Worker, data: Data, epoch: int, status: Callable[..., None],
              trace: Callable[[int, int, list[int]], None] | None = None
              ) -> tuple[dict[str, float], bool, dict[str, np.ndarray]]:
    """Train one epoch, evaluate every eval split, update the best epoch. -> (metrics, whether it improved, the
    epoch's per-class columns, [K] each)."""
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
    classes: dict[str, np.ndarray] = {}
    if cfg.data.sampler != "uniform":  # the class mix the sampler realised, over all workers
        counts = dist.all_reduce_sum(data.class_samples.to(w.device)).cpu().numpy()  # [K]
        classes["train_samples"] = counts
        if len(counts) <= CLASS_METRICS_MAX:
            metrics.update({f"{TRAIN_CLASS_SAMPLES}{c}": float(n) for c, n in enumerate(counts)})
    w.sched.step()
    metrics.update(w.method.end_epoch(epoch))
    confusions = evaluate_splits(w, data, metrics, status, epoch, totals.steps - 1)
    metrics[EPOCH_S] = time.perf_counter() - t0
    metrics[SAMPLES_PER_S] = metrics[TRAIN_SAMPLES] / metrics[EPOCH_S]
    return metrics, select_best(w, epoch, metrics, confusions), {**classes, **class_columns(confusions)}


def evaluate_only(w: Worker, data: Data, epoch: int, status: Callable[..., None]
                  ) -> tuple[dict[str, float], bool, dict[str, np.ndarray]]:
    """An evaluation-only run's one epoch (train.trainable=none: τ-norm): the prepared model scored on every eval
    split as it is — no optimizer step, no batch of the train split, so no train/* metrics. It is reported,
    checkpointed and selected like a trained epoch (epoch 0 of train.epochs=1), which is what sweeps and tables
    read."""
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    confusions = evaluate_splits(w, data, metrics, status, epoch, -1)
    metrics[EPOCH_S] = time.perf_counter() - t0
    return metrics, select_best(w, epoch, metrics, confusions), class_columns(confusions)


def evaluate_splits(w: Worker, data: Data, metrics: dict[str, float], status: Callable[..., None], epoch: int,
                    step: int) -> dict[str, Confusion]:
    """Score every eval split, adding its metrics to ``metrics`` (the status record names the split being scored,
    after training step ``step`` of ``epoch``). -> each split's (true, predicted) counts."""
    confusions = {}
    if w.ema is not None:  # its BatchNorm statistics averaged each worker's own: score rank 0's (the checkpoint's)
        dist.broadcast_module_(w.ema)
    scored = w.ema if w.ema is not None else w.model  # what is evaluated, and so selected
    for split in w.manifest.eval_splits:
        status(epoch, step, f"evaluate {split}")
        counts = evaluate(scored, data.eval(split), w.info.num_classes, w.cfg.train.amp, data.num_bias,
                          data.cluster_columns, data.num_clusters)
        confusions[split] = conf = counts.confusion.cpu()
        metrics.update(split_metrics(split, conf, counts.cells, w.info.class_counts, counts.clusters))
    return confusions


def select_best(w: Worker, epoch: int, metrics: dict[str, float], confusions: dict[str, Confusion]) -> bool:
    """Chosen on validation only (train.select_metric); every other split's numbers of that epoch are reported
    alongside, as best/<split>/<metric>. Adds the best/ keys to ``metrics``; -> whether this epoch is the best."""
    select = w.cfg.train.select_metric
    score = metrics.get(select, float("-inf"))
    improved = score > w.best["score"]
    if improved:  # the counts as tensors (checkpoints hold tensors and plain containers only)
        w.best = {"score": score, "epoch": epoch, "confusions": {s: c.state_dict() for s, c in confusions.items()}}
    metrics.update({BEST_EPOCH: w.best["epoch"], best_key(select): w.best["score"]})
    for split, conf in best_confusions(w.best).items():
        if split != "val":
            metrics.update({best_key(split_key(split, k)): v for k, v in summarize(conf, w.info.class_counts).items()})
    return improved

