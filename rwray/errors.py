"""Every error rwray raises for a user to read, under one base class.

A `RwrayError`'s message is written for the person who ran the job: what is wrong, and the fix. The CLI catches the
base class alone and prints the message with ``exit_code`` (2: the input is wrong, 1: the run failed), never a
traceback; anything else is a bug and keeps its traceback. ``retryable`` says whether restarting the worker group
could help: Ray Train's ``max_failures`` is for lost workers, so a non-retryable error stops the run at once.

Errors raised inside a Ray worker cross to the driver by pickling; each class whose ``__init__`` takes other
arguments than the message says how to rebuild itself (``__reduce__``), so its fields survive the trip.

A leaf: imports nothing from rwray (every other module may import it).
"""

from __future__ import annotations

from typing import Sequence


class RwrayError(Exception):
    """Base of every user-facing rwray error."""

    exit_code: int = 2
    retryable: bool = False


class ConfigError(RwrayError, ValueError):
    """Every problem of a job file (or command line) at once, one per line, each with its dotted path."""

    def __init__(self, problems: Sequence[str], source: str = "config"):
        self.problems, self.source = list(problems), source
        head = f"{source}: {len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))

    def __reduce__(self):
        return type(self), (self.problems, self.source)


class PathError(ConfigError):
    """A path in the job points outside the root it must stay in (a ConfigError: exit code 2 on the CLI)."""

    def __init__(self, problem: str):
        super().__init__([problem], "paths")

    def __reduce__(self):
        return type(self), (self.problems[0],)


class UnknownName(RwrayError, KeyError):
    """A registry lookup of a name nobody registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DataError(RwrayError, ValueError):
    """A problem with data on disk or data parameters; the message names the problem and how to fix it."""


class SourceError(RwrayError, ValueError):
    """A trained-model source (`rwray evaluate` / `predict`) that cannot be loaded."""


class TrackingError(RwrayError, RuntimeError):
    """The MLflow store cannot be used (unreachable, refused credentials, not writable)."""


class RunInUse(TrackingError):
    """Another live driver holds the same (output_dir, run name)."""


class ResourceError(RwrayError, RuntimeError):
    """The run's workers cannot be placed on the cluster's nodes (now, or after waiting for an autoscaler); the
    message shows what was asked, what the nodes have, and the scaling.* values that would fit."""


class CompileUnavailable(RwrayError, RuntimeError):
    """train.compile asked for torch.compile where it cannot run (no C++ compiler for CPU code, an unsupported
    method, a backend that fails on this machine)."""


class ClusterUnreachable(RwrayError, ConnectionError):
    """RAY_ADDRESS names a cluster nobody answers at (ray.init would retry it for minutes)."""


class CheckpointError(RwrayError, ValueError):
    """A checkpoint that cannot be loaded safely or at all; the message names the file and the fix."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"refusing to load checkpoint {path}: {reason}")

    def __reduce__(self):
        return type(self), (self.path, self.reason)


class NotACheckpoint(RwrayError, FileNotFoundError):
    """A folder named as a checkpoint holds no rwray state file."""


class NonFiniteLoss(RwrayError, FloatingPointError):
    """A NaN or infinite per-sample loss or weight: re-running the same step would only repeat it."""

    exit_code = 1

    def __init__(self, epoch: int, step: int, indices: list[int]):
        self.epoch, self.step, self.indices = epoch, step, indices
        super().__init__(
            f"non-finite loss at epoch {epoch}, step {step}, for sample index {indices[:20]}"
            f"{' ...' if len(indices) > 20 else ''}. Inspect those samples (shard column 'index'), lower optim.lr, "
            f"or check the method's parameters (e.g. ABSGD lambda). Training stopped; the last checkpoint is intact.")

    def __reduce__(self):
        return type(self), (self.epoch, self.step, self.indices)


class BatchTooLarge(RwrayError, MemoryError):
    """Out of accelerator memory, re-raised naming the config field to lower (the raw CUDA message does not)."""

    exit_code = 1

    def __init__(self, field: str, size: int, where: str, grad_accum: int = 1, detail: str = ""):
        self.field, self.size, self.where, self.grad_accum, self.detail = field, size, where, grad_accum, detail
        half = max(1, size // 2)
        keep = (f" and train.grad_accum={2 * grad_accum} to keep the effective batch" if field == "data.batch_size"
                else "")
        super().__init__(
            f"out of accelerator memory {where} with {field}={size} per worker{f' ({detail})' if detail else ''}. "
            f"Fix: lower {field} (e.g. {field}={half}{keep}), or use a smaller model, or a GPU with more memory. "
            f"The last checkpoint is intact.")

    def __reduce__(self):
        return type(self), (self.field, self.size, self.where, self.grad_accum, self.detail)


class OutOfMemory(RwrayError, MemoryError):
    """A process of the run used more host memory than its node could give: killed by Ray's memory monitor (or a
    Python MemoryError). The message names the process, where the run was, the memory figures, what Ray Train's
    retries did and the config fields to change; ``details`` keeps what was parsed from Ray's report (rank, pid,
    node, bytes) and Ray's own text, for the driver to complete the report and to file that text in the run's log."""

    exit_code = 1

    def __init__(self, process: str, memory: str, stage: str = "", fix: str = "", retries: str = "", note: str = "",
                 details: dict | None = None, event: str = "was killed"):
        self.process, self.memory, self.stage, self.fix, self.retries, self.note = (process, memory, stage, fix,
                                                                                    retries, note)
        self.details, self.event = dict(details or {}), event  # event: "was killed", or a MemoryError's "ran out"
        lines = [f"out of memory: {process} {event}{f' {stage}' if stage else ''}.", f"  memory: {memory}"]
        lines += [f"  retries: {retries}"] if retries else []
        lines += [f"  fix: {fix}"] if fix else []
        lines += [f"  {note}"] if note else []
        super().__init__("\n".join(lines))

    def __reduce__(self):
        return type(self), (self.process, self.memory, self.stage, self.fix, self.retries, self.note, self.details,
                            self.event)


class RehearsalFailed(RwrayError, RuntimeError):
    """A stage of `rwray rehearse` exited with an error: the command, its exit code and the end of its log."""

    exit_code = 1


class Interrupted(KeyboardInterrupt):
    """The run was stopped from outside: SIGTERM (`kill`, `ray job stop`, a scheduler's preemption notice), Ctrl-C,
    or its Ray Train controller killed on purpose (a Tune scheduler ending the trial, `ray.kill`). A KeyboardInterrupt,
    not an error: the driver unwinds like on Ctrl-C and the MLflow run is marked KILLED (resumable), not FAILED."""

    def __init__(self, reason: str = "stopped by SIGTERM"):
        self.reason = reason
        super().__init__(reason)

    def __reduce__(self):
        return type(self), (self.reason,)
