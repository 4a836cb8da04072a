"""The driver: everything that happens before and after the workers run.

Checks come first and are cheap (config, data, tracking server), so bad input fails before any compute is spent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rwray.config import Config
from rwray.data import DataError, Manifest, prepare, verify


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


def ensure_data(cfg: Config) -> Manifest:
    """Build the shards from data.source on first use; verify checksums, shapes and labels either way."""
    d = cfg.data.dir
    if not (d / "manifest.json").is_file() and cfg.data.source is not None:
        print(f"preparing {cfg.data.source.name} shards in {d} (first use)", flush=True)
        prepare(cfg.data.source, d, cfg.data.builder)
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
        ray.init(log_to_driver=True)
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
        ds = ray.data.read_parquet(manifest.shard_paths(split), shuffle=None).materialize()
        # random_shuffle re-executes on every epoch's iteration: a fresh global order each epoch.
        out[split] = ds.random_shuffle() if split == "train" else ds
    return out


def root_cause(err: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (TrainingFailedError -> worker error -> cause)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "worker_failures", None)
        if isinstance(inner, dict) and inner:
            err = next(iter(inner.values()))
            continue
        for attr in ("cause", "__cause__", "error"):
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
    report callback."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from rwray import tracking
    from rwray.train import checkpoint
    from rwray.train.loop import train_loop_per_worker

    cfg = resolve_paths(cfg)
    uri = tracking.resolve_uri(cfg)
    tracking.preflight(uri)  # before anything is written or computed
    if cfg.resume is not None and not (cfg.resume / checkpoint.STATE).is_file():
        raise FileNotFoundError(f"resume={cfg.resume} is not an rwray checkpoint (no {checkpoint.STATE}); use a "
                                f"checkpoint_* folder under {cfg.storage('ray')}")
    manifest = ensure_data(cfg)
    run_id = tracking.start_run(cfg, uri, manifest.sha256,
                                {**({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}), **(tags or {})})
    error: BaseException | None = None
    try:
        connect_ray(cfg)
        resources = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": cfg.scaling.gpus_per_worker} if cfg.scaling.use_gpu else {})}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": cfg.model_dump(mode="json"), "tracking_uri": uri, "run_id": run_id},
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=f"{cfg.name}-{run_id[:8]}", storage_path=cfg.storage("ray"),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                logging_config=ray.train.LoggingConfig(log_level="WARNING"), callbacks=list(callbacks)),
            datasets=_datasets(manifest),
            dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        )
        result = trainer.fit()
        return RunResult(run_id, uri, dict(result.metrics or {}),
                         result.checkpoint.path if result.checkpoint is not None else None)
    except BaseException as e:
        error = root_cause(e)
        raise error from None
    finally:
        tracking.finish(uri, run_id, error)
