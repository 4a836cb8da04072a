"""Where a run stands, as lines and files: the line per epoch, a progress line inside a long epoch (at most every
``every_s`` seconds: pure, the clock is injected, so tests pin the exact text with a fake clock), and the per-rank
status file an operator or a fault-injection test reads."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from rwray.metrics import BEST_EPOCH, SAMPLES_PER_S, TRAIN_LOSS, TRAIN_LR, best_key, split_key
from rwray.train.faults import memory_fault


def format_duration(seconds: float) -> str:
    """Whole seconds, short: 45s, 1m20s, 2h05m (hours drop the seconds)."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class EpochTicker:
    """Throttled progress of one epoch.

    ``epoch`` and the ``step`` passed to `step` are 0-based, as the loop counts them (``train_epoch``'s
    ``on_step(step)`` runs after step ``step``); lines show them 1-based, like the loop's per-epoch line.
    ``total_steps`` is this epoch's number of steps (None when unknown: no total, no ETA); ``batch_size_global`` is
    the samples one step trains over all workers (per-worker batch size x workers).
    """

    def __init__(self, epoch: int, total_steps: int | None, batch_size_global: int, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.epoch = epoch
        self.total_steps = total_steps
        self.batch_size_global = batch_size_global
        self.every_s = every_s
        self.clock = clock
        self.start = self.last = clock()  # the epoch starts when the ticker is made

    def step(self, step: int) -> str | None:
        """After step ``step`` (0-based): a line if ``every_s`` has passed since the last one (or since the epoch
        started), else None."""
        now = self.clock()
        if now - self.last < self.every_s:
            return None
        self.last = now
        done, elapsed = step + 1, now - self.start
        line = f"  epoch {self.epoch + 1}: step {done}"
        if self.total_steps is not None:
            line += f"/{self.total_steps}"
        if elapsed > 0:
            line += f"  {done * self.batch_size_global / elapsed:,.0f} samples/s"
            if self.total_steps is not None:
                line += f"  ETA {format_duration(max(self.total_steps - done, 0) * elapsed / done)}"
        return line


def progress_line(epoch: int, epochs: int, m: dict[str, float], select: str) -> str:
    """An epoch's line; an evaluation-only epoch (train.trainable=none: no train/* metrics) says so instead of its
    loss, learning rate and throughput."""
    trained = TRAIN_LOSS in m
    return (f"epoch {epoch + 1:>3}/{epochs}  "
            + (f"loss {m[TRAIN_LOSS]:.4f}  lr {m[TRAIN_LR]:.4g}  " if trained else "evaluation only  ")
            + f"val bal-acc {100 * m[split_key('val', 'balanced_acc')]:5.1f}  "
            f"test bal-acc {100 * m[split_key('test', 'balanced_acc')]:5.1f}  "
            f"best {select}={100 * m[best_key(select)]:.1f} @ {int(m[BEST_EPOCH]) + 1}"
            + (f"  {m[SAMPLES_PER_S]:.0f} samples/s" if trained else ""))


STATUS_BYTES = 512  # a status record's fixed size on disk (JSON padded with spaces)


def status_writer(folder: str | None, rank: int, start_epoch: int) -> Callable[..., None]:
    """Progress as <folder>/rank<r>.json {pid, rank, start_epoch, epoch, step, stage}: lets an operator (or a
    fault-injection test) find which process runs which rank, where it resumed and where it is, and the driver say
    where a worker was when it ran out of memory (`rwray.train.oom_report`). ``step`` is the last step done (-1:
    none yet); ``stage`` is "train" unless the caller names another ("evaluate <split>", "final artifacts"). Off
    without a folder. The `rwray.train.faults` memory injector, when set, runs after each call."""
    fault = memory_fault(rank)
    if not folder:
        return (lambda epoch, step, stage="train": None) if fault is None else (
            lambda epoch, step, stage="train": fault(epoch, step))
    path = Path(folder) / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # One in-place write of a fixed-size record per call (~10 us): a new file renamed over the old one costs ~1 ms
    # per step on ext4, which flushes data on every rename over an existing file. A reader that catches a record
    # half-written sees unparsable JSON and takes it as no record.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.ftruncate(fd, 0)
    pid = os.getpid()

    def write(epoch: int, step: int, stage: str = "train") -> None:
        record = json.dumps({"pid": pid, "rank": rank, "start_epoch": start_epoch, "epoch": epoch, "step": step,
                             "stage": stage[:200]})
        os.pwrite(fd, record.encode().ljust(STATUS_BYTES), 0)
        if fault is not None:
            fault(epoch, step)

    return write


def sample_trace(folder: str | None, rank: int) -> Callable[[int, int, "list[int]"], None] | None:
    """Which samples each rank trained, step by step: one JSON line {pid, epoch, step, ids} appended to
    <folder>/rank<r>.jsonl after every step. An audit trail for data provenance and for checking that a restarted
    epoch trains exactly the samples it still owed; off unless the driver had RWRAY_SAMPLE_TRACE_DIR set."""
    if not folder:
        return None
    path = Path(folder) / f"rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()

    def write(epoch: int, step: int, ids: "list[int]") -> None:
        with open(path, "a") as f:
            f.write(json.dumps({"pid": pid, "epoch": epoch, "step": step, "ids": ids}) + "\n")

    return write
