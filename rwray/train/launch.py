"""The driver: everything that happens before and after the workers run.

Checks come first and are cheap (config, paths, tracking server, data: `rwray.train.preflight`), so bad input fails
before any compute is spent and before anything is written.

Fault tolerance (docs/reliability.md): Ray Train restarts a worker group that lost a worker up to
``train.max_failures`` times from the last checkpoint; errors that would only recur (a non-finite loss, out of
memory, bad data, a bug) stop the run at once instead. A driver stopped by Ctrl-C, SIGTERM or `ray job stop` marks
its MLflow run KILLED; starting the same job again (same output_dir and run name) continues that run from its last
checkpoint, in the same MLflow run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rwray import output, tracking
from rwray.config import Config
from rwray.data import Manifest
from rwray.errors import Interrupted
from rwray.train import resources
from rwray.train.identity import RunLock, run_name, start_or_resume
from rwray.train.inputs import streams
from rwray.train.loop import train_loop_per_worker
from rwray.train.preflight import check_paths, check_resume, ensure_data, resolve_paths
from rwray.train import oom_report
from rwray.train.fatal import oom_tolerant_torch_config, root_cause, stop_on_fatal_errors, stopped_from_outside
from rwray.train.rayenv import check_address, connect_ray, data_sources, signals, torch_trainer


@dataclass
class RunResult:
    run_id: str
    tracking_uri: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    model_uri: str | None = None  # the selected weights as an MLflow model (tracking.log_model)
    model_version: int | None = None  # its version under tracking.register


def run(cfg: Config, parent_run_id: str | None = None, callbacks: Sequence[Any] = (),
        tags: dict[str, str] | None = None) -> RunResult:
    """Train one job. Under `rwray tune` / `reproduce`, a trial passes its parent MLflow run, tags and Tune's
    report callback. An unfinished run with the same output_dir, run name and configuration is continued."""
    check_paths(cfg)
    cfg = resolve_paths(cfg)
    uri = tracking.resolve_uri(cfg)
    tracking.preflight(uri)  # before anything is written or computed
    register = cfg.tracking.register if parent_run_id is None else None  # a sweep's trials only log their model
    if register is not None:
        from rwray.tracking.model import check_registry

        check_registry(uri, register)
    check_resume(cfg)
    manifest = ensure_data(cfg)
    check_address(os.environ.get("RAY_ADDRESS"))
    flush_s = cfg.tracking.flush_timeout_s
    run_tags = {**({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}), **(tags or {})}
    with RunLock(cfg):  # a run another driver is training fails here, before anything is written
        # Ray starts in the main thread (it installs signal handlers); meanwhile a thread does what comes after it.
        meanwhile = threading.Thread(target=_imports_and_store, args=(uri,), name="rwray-driver-warmup", daemon=True)
        meanwhile.start()
        connect_ray(cfg)
        meanwhile.join()
        handle = start_or_resume(cfg, uri, manifest.sha256, run_tags, auto_resume=cfg.train.auto_resume)
        run_id = handle.run_id
        logs = output.log_to(log_path(cfg, handle.ray_name))
        output.say(start_line(cfg, manifest, uri, run_id, logs))
        if handle.resumed:
            output.say(f"continuing run {run_name(cfg)!r} ({run_id[:8]}) from {handle.checkpoint}")
        elif handle.note:
            output.say(f"starting a new run {run_name(cfg)!r}: {handle.note}")
        spool = tracking.spool_dir(cfg, run_id)
        # Where each rank is (pid, epoch, step), always kept: the driver reads it to say where a worker ran out of
        # memory (rwray.train.oom_report). RWRAY_WORKER_STATUS_DIR puts it elsewhere (fault-injection tests, operators).
        status_dir = os.environ.get("RWRAY_WORKER_STATUS_DIR") or str(status_path(cfg, handle.ray_name))
        if handle.resumed:  # what a previous driver's workers could not send goes first
            tracking.replay(uri, run_id, spool, timeout_s=min(flush_s, 30.0))
        error: BaseException | None = None
        try:
            import ray.train

            # every split as a dataset input of the run (idempotent: a continued run adds nothing); metadata, so a
            # store that will not take it is reported, not a reason to stop
            try:
                tracking.log_datasets(uri, run_id, manifest)
            except Exception as e:  # noqa: BLE001
                output.say(f"tracking: the run's dataset inputs could not be logged ({type(e).__name__}: "
                           f"{str(e)[:200]}); training goes on")
            with signals():
                # a request no node can hold fails here, in seconds
                resources.check(cfg, say=output.say, streaming=streams(cfg, manifest))
                # Streaming workers read their own row groups: the driver reads no split.
                tables, data = ({}, {}) if streams(cfg, manifest) else data_sources(manifest)
                trainer = torch_trainer(
                    train_loop_per_worker=train_loop_per_worker,
                    train_loop_config={"config": cfg.model_dump(mode="json"), "tracking_uri": uri, "run_id": run_id,
                                       "spool_dir": spool, "tables": tables,
                                       "label": run_name(cfg) if parent_run_id else "",
                                       "status_dir": status_dir,
                                       "trace_dir": os.environ.get("RWRAY_SAMPLE_TRACE_DIR")},
                    scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers,
                                                           use_gpu=cfg.scaling.use_gpu,
                                                           resources_per_worker=resources.request(cfg).bundle),
                    run_config=ray.train.RunConfig(
                        # Reusing the name and storage path is what makes Ray Train V2 restore the run's latest
                        # checkpoint for a restarted driver (ray.train.get_checkpoint() in the loop).
                        name=handle.ray_name, storage_path=cfg.storage("ray"),
                        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
                        callbacks=[stop_on_fatal_errors(cfg.train.max_failures, status_dir, cfg.train.epochs),
                                   *callbacks]),
                    datasets=data,
                    # Nothing is split by Ray: train order and split are the loop's (TrainRows), eval splits are
                    # divided by index % world.
                    dataset_config=ray.train.DataConfig(datasets_to_split=[]),
                    torch_config=oom_tolerant_torch_config(),
                )
                result = trainer.fit()
                published = (publish_model(cfg, uri, run_id, manifest, spool, register) if cfg.tracking.log_model
                             else (None, None))
            return RunResult(run_id, uri, dict(result.metrics or {}),
                             result.checkpoint.path if result.checkpoint is not None else None, *published)
        except BaseException as e:
            error = root_cause(e)
            if isinstance(error, SystemExit) and not isinstance(e, Interrupted):
                error = Interrupted("stopped by SIGINT")  # Ray's Ctrl-C handler aborts the run via sys.exit(0)
            elif stopped_from_outside(error):
                error = Interrupted(f"the Ray Train controller was stopped from outside ({str(error)[:200]})")
            elif (report := oom_report.explain(e, cfg, status_dir, manifest.num_samples("train"),
                                               f"The MLflow run {run_id[:8]} closes as FAILED and keeps the metrics "
                                               f"and checkpoints logged so far.", logs)) is not None:
                if output.captured() and report.details.get("ray_text"):  # Ray's own words, for the log file only
                    logging.getLogger("rwray.oom").warning("Ray's report of the out-of-memory kill:\n%s",
                                                           report.details["ray_text"])
                error = report
            raise error from None
        finally:
            tracking.finish(uri, run_id, error, spool_dir=spool, timeout_s=flush_s)


def _imports_and_store(uri: str) -> None:
    """Ray Train's import (~1 s) and the MLflow store (its import and a new local store's tables, ~2 s). Errors are
    left for the main thread's own calls to raise."""
    with contextlib.suppress(Exception):
        import ray.train.torch  # noqa: F401
    tracking.open_store(uri)


def status_path(cfg: Config, ray_name: str) -> Path:
    """The run's per-rank status folder, beside its log file (a node-local folder when output_dir is an object
    store: then the driver sees only its own node's workers)."""
    return log_path(cfg, ray_name).with_suffix(".status")


def log_path(cfg: Config, ray_name: str) -> Path:
    """Where Ray's and MLflow's lines of a run (or a sweep: Tune's name) go: <output_dir>/logs, or the temporary
    folder when output_dir is an object store."""
    root = Path(tempfile.gettempdir()) / "rwray-logs" if cfg.remote_output else Path(cfg.output_dir) / "logs"
    return root / f"{ray_name}.log"


def start_line(cfg: Config, manifest: Manifest, uri: str, run_id: str, logs: Path | None) -> str:
    s = cfg.scaling
    per_worker = f"{s.cpus_per_worker:g} CPU" + (f" + {s.gpus_per_worker:g} GPU" if s.use_gpu else "")
    sizes = ", ".join(f"{manifest.num_samples(split)} {split}" for split in ("train", *manifest.eval_splits))
    where = f"; logs: {logs}" if logs is not None else ""
    return (f"{run_name(cfg)}: {cfg.method_label} on {Path(cfg.data.dir).name} ({sizes}); "
            f"{s.num_workers} worker{'s' if s.num_workers != 1 else ''} x {per_worker}; "
            f"MLflow run {run_id[:8]} at {uri}{where}")


def publish_model(cfg: Config, uri: str, run_id: str, manifest: Manifest, spool: str,
                  register: str | None) -> tuple[str | None, int | None]:
    """After training: the run's best checkpoint (chosen on validation) as its MLflow model, and a registry version
    under ``register``. -> (model URI, version). A run that already logged its model (a driver restarted at the
    very end) logs nothing again.

    A failure here does not undo a finished training: it is reported and the run is closed as usual, unless a
    registration was asked for, which is then an error (the job's promised output is missing)."""
    from rwray.errors import TrackingError
    from rwray.tracking import model as logged
    from rwray.train import checkpoint, export

    try:
        # rank 0 sends the best checkpoint through its spool: what an outage left there goes first (briefly: the
        # run's closing replays it again for the full flush_timeout_s)
        left = tracking.replay(uri, run_id, spool, timeout_s=min(cfg.tracking.flush_timeout_s, 60.0))
        if left:
            raise ConnectionError(f"{left} item(s) of the run, maybe its best checkpoint, are still unsent")
        # MLflow's own retries (minutes per call) bounded: a server down at the end costs seconds, not minutes
        with tracking.quick_http(retries=3, timeout_s=300), tempfile.TemporaryDirectory() as tmp:
            if (done := logged.logged_model(uri, run_id)) is not None:
                return done, None
            path = logged.download_best_state(uri, run_id, tmp)
            if path is None:
                raise FileNotFoundError(f"the run has no {logged.BEST_STATE} in MLflow (it may still be in a "
                                        f"worker's spool on another node)")
            state = checkpoint.load(path.parent)  # weights only: nothing from the store is unpickled as code
            net = export.selected_network(cfg, manifest, state)
            card = export.describe(cfg, manifest, state)
            (Path(tmp) / "config.yaml").write_text(cfg.to_yaml())
            tags = {"rwray.select_metric": card["select_metric"], "rwray.select_value": repr(card["select_value"]),
                    "rwray.epoch": str(card["epoch"]), "rwray.run_id": run_id,
                    "rwray.data_manifest_sha256": manifest.sha256}
            model_uri, version = logged.log_model(
                uri, run_id, net, export.example_images(cfg, manifest), manifest.num_classes, step=card["epoch"],
                metadata={"rwray": card}, tags=tags, register=register,
                extra_files=[str(Path(tmp) / "config.yaml")])
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - tracking, export or download: reported, training stands
        what = f"{type(e).__name__}: {str(e)[:300]}"
        if register is not None:
            raise TrackingError(f"the selected model could not be logged to {uri}, so it is not registered as "
                                f"{register!r} ({what}). The run's metrics and checkpoints are logged.") from None
        output.say(f"tracking: the selected model could not be logged to {uri} ({what}); the run's metrics and "
                   f"checkpoints are unaffected")
        return None, None
    output.say(f"model (epoch {card['epoch'] + 1}, {card['select_metric']} {card['select_value']:.4f}): {model_uri}"
               + (f", registered as {register!r} version {version}" if version is not None else ""))
    return model_uri, version
