"""What a worker hands on: checkpoints to Ray Train (every train.checkpoint_every epochs, after the best and the last
epoch, and mid-epoch positions), their restore, the epoch's metrics to MLflow through rank 0's spool once a
checkpoint covers them (with more than CLASS_METRICS_MAX classes, the epoch's per-class numbers as one table), and
the run's final artifacts (last weights, per-class table, test confusion counts and their plots)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rwray import dist, output, tables
from rwray.metrics import (CLASS_METRICS_MAX, Confusion, class_columns, group_confusion, most_confused_classes,
                           per_class_accuracy, sub_confusion)
from rwray.tracking import BufferedRunLogger
from rwray.train import checkpoint, plan
from rwray.train.epoch import EpochTotals
from rwray.train.progress import progress_line
from rwray.train.worker import Worker


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
                 log: BufferedRunLogger | None, classes: dict[str, np.ndarray] | None = None) -> None:
    """Report the epoch to Ray Train, with a checkpoint (rank 0 writes it) every train.checkpoint_every epochs and
    after the last; then log the metrics the checkpoint covers. With more than CLASS_METRICS_MAX classes the
    epoch's per-class ``classes`` columns ([K] each) go to MLflow as one table, ``per_class/epoch_<e>.parquet``
    (a replayed epoch writes the same file again)."""
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
            if classes and w.info.num_classes > CLASS_METRICS_MAX:
                path = Path(tmp) / f"epoch_{epoch:03d}.parquet"
                tables.write_columns(path, {**class_index(w), **classes})
                log.artifact(path, "per_class")
            say(w, progress_line(epoch, cfg.epochs, metrics, cfg.select_metric))


def say(w: Worker, line: str) -> None:
    output.worker_line(f"{w.label}  {line}" if w.label else line)


def class_index(w: Worker) -> dict[str, np.ndarray]:
    """The leading columns of every per-class table: class id, name and training count, [K] each."""
    k = w.info.num_classes
    return {"class": np.arange(k, dtype=np.int64), "name": np.asarray(w.manifest.classes[:k], dtype=object),
            "train_count": np.asarray(w.info.class_counts, dtype=np.int64)}


def best_confusions(best: dict[str, Any]) -> dict[str, Confusion]:
    """The best epoch's counts by split (a checkpoint written before sparse counts holds dense [K, K] "cms")."""
    return {s: Confusion.from_state(c) for s, c in (best.get("confusions") or best.get("cms") or {}).items()}


MOST_CONFUSED = 30  # classes drawn in the confusion overview of a split with more than plots.CONFUSION_DRAWN classes


def log_final_artifacts(log: BufferedRunLogger, w: Worker) -> None:
    """The last weights; at the best epoch, every eval split's per-class table and the test split's confusion
    counts (a dense JSON matrix for few classes, the (true, predicted, count) pairs otherwise) with their plots,
    each bounded in size at any number of classes."""
    from rwray import plots  # matplotlib: imported by the worker that draws, not by every driver

    best, classes, info = w.best, w.manifest.classes, w.info
    confusions = best_confusions(best)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(dist.unwrap(w.model).state_dict(), tmp / "model.pt")
        log.artifact(tmp / "model.pt", "checkpoints/last")
        if w.ema is not None:  # the weights the metrics were measured on
            torch.save(w.ema.module.state_dict(), tmp / "model_ema.pt")
            log.artifact(tmp / "model_ema.pt", "checkpoints/last")
        conf = confusions["test"]
        names = ["per_class.parquet", "per_class_accuracy.png", "confusion_matrix.png"]
        tables.write_columns(tmp / "per_class.parquet", {**class_index(w), **class_columns(confusions)})
        plots.per_class_accuracy(per_class_accuracy(conf).tolist(), info.class_counts, classes,
                                 f"test accuracy per class (epoch {best['epoch'] + 1}, chosen on val)",
                                 tmp / "per_class_accuracy.png")
        if conf.num_classes <= plots.CONFUSION_DRAWN:
            cm = conf.dense()
            (tmp / "confusion_matrix.json").write_text(json.dumps({
                "classes": classes, "rows_true_cols_pred": cm.tolist(), "epoch": best["epoch"], "split": "test"}))
            plots.confusion_matrix(cm.numpy(), classes, "test confusion matrix (row-normalised)",
                                   tmp / "confusion_matrix.png")
            names.append("confusion_matrix.json")
        else:  # every pair that occurs (at most the split's size), and a bounded picture of them
            tables.write_columns(tmp / "confusion_pairs.parquet", {"true": conf.true.numpy(),
                                                                   "pred": conf.pred.numpy(),
                                                                   "count": conf.counts.numpy()})
            groups, group_cm = group_confusion(conf, info.class_counts)
            worst = most_confused_classes(conf, MOST_CONFUSED)
            plots.confusion_overview(groups, group_cm, [classes[c] for c in worst], sub_confusion(conf, worst),
                                     conf.per_class()[1][worst].tolist(),
                                     f"test confusion, {conf.num_classes} classes (epoch {best['epoch'] + 1})",
                                     tmp / "confusion_matrix.png")
            names.append("confusion_pairs.parquet")
        for name in names:
            log.artifact(tmp / name, "evaluation")
        for path in w.method.artifacts(str(tmp)):
            log.artifact(path, "method")
