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

from rwray import output
from rwray.config import Config
from rwray.data import Manifest
from rwray.errors import Interrupted, RwrayError
from rwray.train.resources import local_cpus


def connect_ray(cfg: Config, concurrent_runs: int = 1) -> None:
    """Join RAY_ADDRESS when set (a cluster or `ray start --head`), otherwise start a local Ray."""
    import ray

    ray_train_settings()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, configure_logging=not output.captured())
        output.attach_ray()
        return
    # A laptop is not preempted, and without a dashboard nothing reads Ray Train's metrics: fewer actors and
    # callbacks per run.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    # The machine's CPUs plus two slots per concurrent run for Ray Data's tasks (Train workers hold theirs for
    # the whole run; without spare slots a read would wait forever). Never sized to the request: a request the
    # machine cannot hold is refused by resources.check. Worker processes import torch: on a loaded laptop that
    # can take longer than Ray Train's default 60 s start-up timeout.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    ray.init(num_cpus=local_cpus(os.cpu_count() or 1, concurrent_runs), include_dashboard=False, log_to_driver=True,
             configure_logging=not output.captured())
    output.attach_ray()


def ray_train_settings() -> None:
    """Ray Train V2 reads these in its controller and workers, copied there from the driver's environment (a
    user's own setting wins).

    - The controller polls its workers every HEALTH_CHECK_INTERVAL_S (default 2 s) and a worker's report waits
      until the previous one was collected: epochs shorter than the interval would all last the interval.
    - Its print patch logs each print() of a worker a second time through the root logger.
    """
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def quiet_data() -> None:
    """Ray Data's per-operator progress bars would bury the one progress line per epoch."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


SMALL_SPLIT_BYTES = 256 << 20  # a split this small is handed to Ray Data from memory, not by read tasks


def datasets(manifest: Manifest) -> dict[str, Any]:
    """Every split as a Ray Dataset for the trainer, read once before the workers start: no read task competes
    with the workers for CPU. Each worker streams a split once and keeps it (rwray.train.batches)."""
    import pyarrow.parquet as pq
    import ray.data

    quiet_data()
    out = {}
    for split in ("train", *manifest.eval_splits):
        files = manifest.shard_paths(split)
        if sum(os.path.getsize(f) for f in files) <= SMALL_SPLIT_BYTES:
            # from_arrow puts the table in the object store as it is: no read tasks, no execution to wait for
            # (read_parquet().materialize() takes seconds per split even for a few thousand rows).
            out[split] = ray.data.from_arrow(pq.read_table(files))
        else:
            out[split] = ray.data.read_parquet(files, shuffle=None).materialize()
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
