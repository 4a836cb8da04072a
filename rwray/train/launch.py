"""The driver: everything that happens before and after the workers run.

Checks come first and are cheap (config, paths, tracking server, data), so bad input fails before any compute is
spent and before anything is written.

Fault tolerance (docs/reliability.md): Ray Train restarts a worker group that lost a worker up to
``train.max_failures`` times from the last checkpoint; errors that would only recur (a non-finite loss, out of
memory, bad data, a bug) stop the run at once instead. A driver stopped by Ctrl-C, SIGTERM or `ray job stop` marks
its MLflow run KILLED; starting the same job again (same output_dir and run name) continues that run from its last
checkpoint, in the same MLflow run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from rwray.config import Config
from rwray.data import Manifest, prepare, verify
from rwray.errors import CheckpointError, ConfigError, DataError, Interrupted, NotACheckpoint, RwrayError


@dataclass
class RunResult:
    run_id: str
    tracking_uri: str
    metrics: dict[str, Any]
    checkpoint_path: str | None


def resolve_paths(cfg: Config) -> Config:
    """Absolute paths everywhere: Ray Train workers run in their own working directory."""
    cfg = cfg.model_copy(deep=True)
    if not cfg.remote_output:
        cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    cfg.data.dir = Path(cfg.data.dir).expanduser().resolve()
    if cfg.resume is not None:
        cfg.resume = Path(cfg.resume).expanduser().resolve()
    if cfg.data.source is not None and getattr(cfg.data.source, "root", None) is not None:
        cfg.data.source.root = Path(cfg.data.source.root).expanduser().resolve()
    return cfg


def check_paths(cfg: Config) -> None:
    """Refuse paths that leave their roots (rwray.paths): before resolve_paths, so messages show what the user
    wrote. The run name becomes a folder under output_dir/ray."""
    from rwray import paths, tracking

    paths.safe_component(tracking.run_name(cfg), "tracking.run_name" if cfg.tracking.run_name else "name")
    if cfg.resume is not None and not cfg.remote_output:
        paths.require_inside(cfg.output_dir, cfg.resume, "resume",
                             f"Fix: resume from a checkpoint_* folder under {cfg.storage('ray')} (copy a checkpoint "
                             f"from elsewhere into output_dir first)")


def ensure_data(cfg: Config) -> Manifest:
    """Build the shards from data.source on first use; verify checksums, shapes and labels either way."""
    from rwray.paths import check_shard_files

    d = cfg.data.dir
    if not (d / "manifest.json").is_file() and cfg.data.source is not None:
        print(f"preparing {cfg.data.source.name} shards in {d} (first use)", flush=True)
        prepare(cfg.data.source, d, cfg.data.builder)
    listed = Manifest.load(d)  # before verify reads a byte: every listed file must be inside d
    check_shard_files(d, [s["file"] for split in listed.data["splits"].values()
                          for s in (split.get("shards", []) if isinstance(split, dict) else [])])
    manifest = verify(d)
    if manifest.num_samples("val") == 0:
        raise DataError(f"{d} has no validation split, and models are selected on validation only: prepare it "
                        f"with --val-per-class > 0 (data.builder.val_per_class)")
    return manifest


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


def _datasets(manifest: Manifest) -> dict[str, Any]:
    import ray.data

    quiet_data()
    out = {}
    for split in ("train", *manifest.eval_splits):
        # Materialized once (no read tasks compete with the workers for CPU). The train order is not Ray's
        # random_shuffle (unseeded: a restart would see another order) but a (seed, epoch) permutation each worker
        # applies to the split it streams once and keeps (loop.TrainRows).
        out[split] = ray.data.read_parquet(manifest.shard_paths(split), shuffle=None).materialize()
    return out


def _stopped_from_outside(err: BaseException) -> bool:
    """Ray reports a deliberately killed actor (ray.kill, a Tune trial stopped by its scheduler) as died with exit
    type INTENDED; a crash says SYSTEM_ERROR. Only the message carries it."""
    from ray.exceptions import RayActorError

    return isinstance(err, RayActorError) and "exit type: INTENDED" in str(err)


@contextlib.contextmanager
def _signals() -> Iterator[None]:
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


BUGS = (TypeError, NameError, AttributeError, ImportError, AssertionError, NotImplementedError)


def is_fatal(err: BaseException) -> bool:
    """Errors a restart would only repeat: Ray Train's max_failures is for lost workers, not for these."""
    return isinstance(err, BUGS) or (isinstance(err, RwrayError) and not err.retryable)


def _stop_on_fatal_errors():
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


def run(cfg: Config, parent_run_id: str | None = None, callbacks: Sequence[Any] = (),
        tags: dict[str, str] | None = None) -> RunResult:
    """Train one job. Under `rwray tune` / `reproduce`, a trial passes its parent MLflow run, tags and Tune's
    report callback. An unfinished run with the same output_dir, run name and configuration is continued."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from rwray import tracking
    from rwray.train import checkpoint
    from rwray.train.loop import train_loop_per_worker

    check_paths(cfg)
    cfg = resolve_paths(cfg)
    uri = tracking.resolve_uri(cfg)
    tracking.preflight(uri)  # before anything is written or computed
    if cfg.resume is not None:
        if not (cfg.resume / checkpoint.STATE).is_file():
            raise NotACheckpoint(f"resume={cfg.resume} is not an rwray checkpoint (no {checkpoint.STATE}); use a "
                                    f"checkpoint_* folder under {cfg.storage('ray')}")
        try:
            checkpoint.load(cfg.resume)  # refuse an unsafe or unreadable file here, not in every worker
        except CheckpointError as e:
            raise ConfigError([f"resume: {e}"], "resume") from None
    manifest = ensure_data(cfg)
    flush_s = cfg.tracking.flush_timeout_s
    run_tags = {**({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}), **(tags or {})}
    with tracking.RunLock(cfg):
        handle = tracking.start_or_resume(cfg, uri, manifest.sha256, run_tags,
                                          auto_resume=cfg.train.auto_resume)
        run_id = handle.run_id
        if handle.resumed:
            print(f"continuing run {tracking.run_name(cfg)!r} ({run_id[:8]}) from {handle.checkpoint}", flush=True)
        elif handle.note:
            print(f"starting a new run {tracking.run_name(cfg)!r}: {handle.note}", flush=True)
        spool = tracking.spool_dir(cfg, run_id)
        if handle.resumed:  # what a previous driver's workers could not send goes first
            tracking.replay(uri, run_id, spool, timeout_s=min(flush_s, 30.0))
        error: BaseException | None = None
        try:
            with _signals():
                connect_ray(cfg)
                resources = {"CPU": cfg.scaling.cpus_per_worker,
                             **({"GPU": cfg.scaling.gpus_per_worker} if cfg.scaling.use_gpu else {})}
                trainer = TorchTrainer(
                    train_loop_per_worker,
                    train_loop_config={"config": cfg.model_dump(mode="json"), "tracking_uri": uri, "run_id": run_id,
                                       "spool_dir": spool,
                                       "status_dir": os.environ.get("RWRAY_WORKER_STATUS_DIR")},
                    scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers,
                                                           use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources),
                    run_config=ray.train.RunConfig(
                        # Reusing the name and storage path is what makes Ray Train V2 restore the run's latest
                        # checkpoint for a restarted driver (ray.train.get_checkpoint() in the loop).
                        name=handle.ray_name, storage_path=cfg.storage("ray"),
                        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
                        callbacks=[_stop_on_fatal_errors(), *callbacks]),
                    datasets=_datasets(manifest),
                    # Nothing is split by Ray: train order and split are the loop's (TrainRows), eval splits are
                    # divided by index % world.
                    dataset_config=ray.train.DataConfig(datasets_to_split=[]),
                )
                result = trainer.fit()
            return RunResult(run_id, uri, dict(result.metrics or {}),
                             result.checkpoint.path if result.checkpoint is not None else None)
        except BaseException as e:
            error = root_cause(e)
            if isinstance(error, SystemExit) and not isinstance(e, Interrupted):
                error = Interrupted("stopped by SIGINT")  # Ray's Ctrl-C handler aborts the run via sys.exit(0)
            elif _stopped_from_outside(error):
                error = Interrupted(f"the Ray Train controller was stopped from outside ({str(error)[:200]})")
            raise error from None
        finally:
            tracking.finish(uri, run_id, error, spool_dir=spool, timeout_s=flush_s)
