"""The driver's side of Ray: joining or starting Ray, the datasets handed to Ray Train, signals while it runs, and
reading Ray's errors (which ones a restart would only repeat, what a wrapped error really was).

Fault tolerance (docs/reliability.md): Ray Train restarts a worker group that lost a worker up to
``train.max_failures`` times from the last checkpoint; errors that would only recur (a non-finite loss, out of
memory, bad data, a bug) stop the run at once instead (`StopOnFatalErrors`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator

from rwray.config import Config
from rwray.data import Manifest
from rwray.errors import Interrupted, RwrayError


def connect_ray(cfg: Config, concurrent_runs: int = 1) -> None:
    """Join RAY_ADDRESS when set (a cluster or `ray start --head`), otherwise start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    # Train workers hold whole CPUs for the run; Ray Data's read and shuffle tasks need slots of their own or the
    # run waits forever on a small machine. Declare more logical CPU than the workers take: two slots per
    # concurrent run for its data tasks. Worker processes import torch: on a loaded laptop that can take longer
    # than Ray Train's default 60 s start-up timeout.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    cpus = max(os.cpu_count() or 1, concurrent_runs * cfg.scaling.num_workers * cfg.scaling.cpus_per_worker) \
        + 2 * concurrent_runs
    ray.init(num_cpus=int(cpus + 0.999), include_dashboard=False, log_to_driver=True)


def quiet_data() -> None:
    """Ray Data's per-operator progress bars would bury the one progress line per epoch."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


def datasets(manifest: Manifest) -> dict[str, Any]:
    """Every split as a Ray Dataset for the trainer."""
    import ray.data

    quiet_data()
    out = {}
    for split in ("train", *manifest.eval_splits):
        # Materialized once (no read tasks compete with the workers for CPU). The train order is not Ray's
        # random_shuffle (unseeded: a restart would see another order) but a (seed, epoch) permutation each worker
        # applies to the split it streams once and keeps (rwray.train.batches.TrainRows).
        out[split] = ray.data.read_parquet(manifest.shard_paths(split), shuffle=None).materialize()
    return out


@contextlib.contextmanager
def signals() -> Iterator[None]:
    """SIGTERM raises Interrupted for the duration; SIGINT is Ray's (fit aborts its controller on Ctrl-C) and is
    restored afterwards, since Ray leaves a handler bound to a finished controller. Main thread only: under Tune a
    trial's driver runs in a thread, and Tune handles signals itself."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Interrupted(f"stopped by {signal.Signals(signum).name}")

    old_term, old_int = signal.signal(signal.SIGTERM, on_term), signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


def stopped_from_outside(err: BaseException) -> bool:
    """Ray reports a deliberately killed actor (ray.kill, a Tune trial stopped by its scheduler) as died with exit
    type INTENDED; a crash says SYSTEM_ERROR. Only the message carries it."""
    from ray.exceptions import RayActorError

    return isinstance(err, RayActorError) and "exit type: INTENDED" in str(err)


BUGS = (TypeError, NameError, AttributeError, ImportError, AssertionError, NotImplementedError)


def is_fatal(err: BaseException) -> bool:
    """Errors a restart would only repeat: Ray Train's max_failures is for lost workers, not for these."""
    return isinstance(err, BUGS) or (isinstance(err, RwrayError) and not err.retryable)


def stop_on_fatal_errors():
    """A Ray Train callback (it runs in the controller) that turns a deterministic worker error into a controller
    error, which Ray Train does not retry: without it, a NaN loss would be re-run max_failures times."""
    import ray.train

    class StopOnFatalErrors(ray.train.UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for err in worker_exceptions.values():
                cause = root_cause(err)
                if is_fatal(cause):
                    raise cause

    return StopOnFatalErrors()


def root_cause(err: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (TrainingFailedError -> worker error -> cause)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "worker_failures", None)
        if isinstance(inner, dict) and inner:
            err = next(iter(inner.values()))
            continue
        for attr in ("controller_failure", "cause", "__cause__", "error"):
            nxt = getattr(err, attr, None)
            if isinstance(nxt, BaseException):
                err = nxt
                break
        else:
            break
    return err
