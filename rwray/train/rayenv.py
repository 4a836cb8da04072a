"""The driver's side of Ray: joining or starting Ray, the data handed to Ray Train, signals while it runs.
Which errors stop a run (they are read in Ray's controller) is `rwray.train.fatal`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from typing import Any, Iterator

from rwray import output
from rwray.config import Config
from rwray.data import Manifest
from rwray.errors import ClusterUnreachable, Interrupted
from rwray.train.resources import local_cpus

_started_here = False  # this process started the Ray it is connected to (no other job, no autoscaler)
# Ray Train's placement-group cleaner asks the state API every second whether the controller lives, and says so
# each time it cannot ask. A Ray started here has no dashboard, so no state API (and ends with this process, its
# placement groups with it): a line a second in a run's log file (633 of the 640 lines of a 12-minute run).
NO_STATE_API = ("Failed to query Ray Train Controller actor state",)


def connect_ray(cfg: Config, concurrent_runs: int = 1) -> None:
    """Join RAY_ADDRESS when set (a cluster or `ray start --head`), otherwise start a local Ray."""
    import ray

    ray_train_settings()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        check_address(os.environ["RAY_ADDRESS"])
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
    # A Ray started for one command sends no usage statistics (the user's own setting wins); collecting them costs
    # ray.init ~1 s.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=local_cpus(os.cpu_count() or 1, concurrent_runs), include_dashboard=False, log_to_driver=True,
             configure_logging=not output.captured())
    global _started_here
    _started_here = True
    output.attach_ray(drop=NO_STATE_API)


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """An unreachable RAY_ADDRESS fails in seconds: ray.init would retry it for minutes. One TCP connection to the
    address's host:port (a GCS, `ray start --head`'s 6379, or a ray:// client server); "auto" and "local" are
    Ray's to resolve."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterUnreachable(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({e.__class__.__name__}: {e}). Start it "
            f"(`ray start --head`), fix RAY_ADDRESS, or unset it to train on a local Ray. Nothing was trained."
        ) from None


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


SMALL_SPLIT_BYTES = 256 << 20  # a split up to this size on disk reaches the workers as one in-memory table


def data_sources(manifest: Manifest) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every split, for the workers: -> (tables, datasets), each keyed by split name.

    A small split is read here into one Arrow table and put in Ray's object store; each worker fetches it with one
    ray.get (zero-copy on the driver's node) and keeps it (rwray.train.batches): no Ray Data execution, which costs
    seconds per split even for a few thousand rows. A larger split is a Ray Dataset that each worker streams; it is
    materialised once here, before the workers start, so no read task competes with them for CPU.
    """
    import pyarrow.parquet as pq
    import ray

    tables, data = {}, {}
    for split in ("train", *manifest.eval_splits):
        files = manifest.shard_paths(split)
        if sum(os.path.getsize(f) for f in files) <= SMALL_SPLIT_BYTES:
            tables[split] = ray.put(pq.read_table(files))
        else:
            import ray.data

            quiet_data()
            data[split] = ray.data.read_parquet(files, shuffle=None).materialize()
    return tables, data


def torch_trainer(**kwargs: Any):
    """A `TorchTrainer`, less two pieces of Ray's plumbing a run does not use.

    - Ray Train 2.60 starts a DatasetManager actor for every run, datasets or not: one more process importing Ray
      Data (~1.5 s of CPU), started while the workers import torch, on a laptop the CPU their start-up waits for.
      Left out when no split is a Dataset.
    - Its scaling policy registers the workers' resources with an AutoscalingCoordinator actor, created on first
      use, and the controller waits for it before it asks for the workers (~1.5 s here). That actor tells an
      autoscaler and concurrent Ray Data jobs what Train holds: on the Ray this process started itself there is
      neither, and the policy skips it (`local_scaling_policy`). On any other Ray it is Ray's own.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return callbacks if self.datasets else [c for c in callbacks if not isinstance(c, DatasetsCallback)]

        def _initialize_and_run_controller(self, **controller_kwargs):
            if _started_here and not self.scaling_config.elasticity_enabled:
                controller_kwargs["scaling_policy"] = local_scaling_policy(self.scaling_config)
            return super()._initialize_and_run_controller(**controller_kwargs)

    return Trainer(**kwargs)


def local_scaling_policy(scaling_config):
    """Ray Train's fixed-size policy (the same decisions) without the AutoscalingCoordinator round-trips. Defined
    here, not at module level, so the controller unpickles it without importing rwray."""
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    class LocalFixedScalingPolicy(FixedScalingPolicy):
        def after_controller_start(self, train_run_context):
            pass

        def _maybe_send_resource_request(self):
            pass

        def _cancel_resource_request(self):
            pass

    return LocalFixedScalingPolicy(scaling_config)


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
