"""MLflow at the edge: the driver checks the tracking server and creates the run; rank 0 logs into it.

One MLflow run per job. The default store is embedded: a sqlite file under the job's output_dir, with artifacts
beside it, so nothing needs to be running. ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` points at a server instead.

This module knows MLflow only: which run continues which (the run's identity, Ray's checkpoints) is
`rwray.train.identity`'s; the durable logger the workers use is `rwray.tracking.spool`'s.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Mapping

from rwray import output
from rwray.config import Config
from rwray.errors import TrackingError
from rwray.tracking.spool import replay
from rwray.tracking.transport import client, quick_http, retry, sleep_until

PARAM_BATCH = 100  # MLflow accepts at most 100 params per log_batch call


def store_uri(uri: str | None, output_dir: str | Path = "runs") -> str:
    """``uri``, else $MLFLOW_TRACKING_URI, else an absolute sqlite path under the local ``output_dir``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db')}"


def resolve_uri(cfg: Config) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else an absolute sqlite path under output_dir."""
    if cfg.remote_output and not (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise TrackingError(f"output_dir is {cfg.output_dir}: a local MLflow store cannot live there. Set "
                            f"tracking.uri (or MLFLOW_TRACKING_URI) to your MLflow server, e.g. the head node's.")
    return store_uri(cfg.tracking.uri, cfg.output_dir)


def artifact_root(cfg: Config) -> str | None:
    """Where a local store keeps artifacts (absolute: Ray workers run in another working directory)."""
    uri = resolve_uri(cfg)
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri() if not cfg.remote_output else None
    return None  # a server decides (--artifacts-destination / --default-artifact-root)


def preflight(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any compute, when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        import requests

        auth = None
        if os.environ.get("MLFLOW_TRACKING_USERNAME"):
            auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        headers = {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"} if os.environ.get("MLFLOW_TRACKING_TOKEN") else {}
        url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
        try:
            r = requests.get(url, params={"max_results": 1}, timeout=timeout_s, auth=auth, headers=headers)
        except requests.RequestException as e:
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {uri} ({e.__class__.__name__}). Start it "
                f"(e.g. `mlflow server --host 127.0.0.1 --port 5000`), fix tracking.uri / MLFLOW_TRACKING_URI, or unset "
                f"both to record into the local sqlite store under output_dir. Nothing was trained.") from None
        if r.status_code in (401, 403):
            raise TrackingError(f"the MLflow server at {uri} refused the credentials (HTTP {r.status_code}); set "
                                f"MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN. Nothing was trained.")
        if r.status_code != 200:
            raise TrackingError(f"{uri} answered HTTP {r.status_code} to an MLflow API call: is it an MLflow tracking "
                                f"server? Nothing was trained.")
    elif uri.startswith("sqlite:///"):
        # Nothing is created here (a bad run leaves nothing behind); the nearest existing folder must be writable.
        folder = Path(uri[len("sqlite:///"):]).parent
        while not folder.exists():
            folder = folder.parent
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"cannot write the local MLflow store under {folder}: choose another output_dir or "
                                f"tracking.uri")


def open_store(uri: str) -> None:
    """Import MLflow and open the store, which MLflow then keeps: a new local store creates its tables here (with
    the import, ~2 s on a laptop). For a driver's background thread, after `preflight`: an error is left for the
    caller's own first call to raise, with its message."""
    with contextlib.suppress(Exception):
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        client(uri).search_experiments(max_results=1)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {f"version.{p}": version(p) for p in ("rwray", "torch", "ray", "mlflow", "pyarrow")}


def start_run(cfg: Config, uri: str, manifest_sha256: str, extra_tags: Mapping[str, str] = ()) -> str:
    """Create (or reuse) the experiment and a new run; log params, tags and the resolved config. -> run_id."""
    from mlflow.entities import Param, RunTag

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    c = client(uri)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(cfg.tracking.experiment, artifact_location=artifact_root(cfg))
    tags = {"rwray.git_commit": _git_commit(), "rwray.data_manifest_sha256": manifest_sha256,
            "rwray.method": cfg.method.name, "rwray.model": cfg.model.name, **_versions(), **dict(extra_tags)}
    run = c.create_run(exp_id, run_name=cfg.tracking.run_name or cfg.name, tags=tags)
    run_id = run.info.run_id
    params = [Param(k, str(v)[:6000]) for k, v in sorted(cfg.flat().items())]
    for i in range(0, len(params), PARAM_BATCH):
        c.log_batch(run_id, params=params[i:i + PARAM_BATCH])
    c.log_text(run_id, cfg.to_yaml(), "config.yaml")
    c.log_batch(run_id, tags=[RunTag("mlflow.note.content", f"rwray job {cfg.name}")])
    return run_id


INTERRUPTIONS = (KeyboardInterrupt, SystemExit)  # Ctrl-C, SIGTERM (rwray.errors.Interrupted), `ray job stop`


def finish(uri: str, run_id: str, error: BaseException | None, status: str | None = None,
           spool_dir: str | Path | None = None, timeout_s: float = 120.0) -> bool:
    """Close the run: FINISHED, FAILED (an error) or KILLED (interrupted: the run can be resumed by name).

    Sends what the workers could not (``spool_dir``) first, then the status, retrying for up to ``timeout_s``. A
    tracking server that is down at the end never turns a finished training into an error: this warns and returns
    False instead (the run then stays RUNNING and the spool keeps every unsent item for the next start).
    """
    if status is None:
        status = "KILLED" if isinstance(error, INTERRUPTIONS) else "FAILED" if error is not None else "FINISHED"
    if status == "KILLED":
        timeout_s = min(timeout_s, 10.0)  # someone is waiting for Ctrl-C / SIGTERM to take effect
    deadline = time.monotonic() + timeout_s
    left = 0
    if spool_dir is not None and status != "KILLED":  # an interrupted driver exits now; the next start replays
        left = replay(uri, run_id, spool_dir, timeout_s)

    def terminate() -> None:
        with quick_http():
            c = client(uri)
            if error is not None:
                c.set_tag(run_id, "rwray.error", f"{type(error).__name__}: {error}"[:5000])
            c.set_terminated(run_id, status=status)

    errors: list[Exception] = []
    if not retry(terminate, sleep_until(deadline), max_delay_s=10.0, on_error=errors.append):
        last = errors[-1]
        output.say(f"tracking: could not mark run {run_id} {status} at {uri} ({type(last).__name__}: "
                   f"{str(last)[:200]}); training itself is unaffected")
        return False
    if left:
        output.say(f"tracking: {left} item(s) of run {run_id} are still unsent in {spool_dir}; they are sent the "
                   f"next time this run name is started")
    return True


class RunLogger:
    """The driver's handle on a run it logs into directly (a sweep's or a table's parent run)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self._client = client(uri)

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, name: str) -> None:
        self._client.log_text(self.run_id, text, name)
