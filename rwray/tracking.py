"""MLflow at the edge: the driver checks the tracking server and creates the run; rank 0 logs into it.

One MLflow run per job. The default store is embedded: a sqlite file under the job's output_dir, with artifacts
beside it, so nothing needs to be running. ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` points at a server instead.

A run is identified by (output_dir, run name): `start_or_resume` continues an unfinished run of the same name and
configuration instead of creating a new one (see docs/reliability.md). Workers log through `BufferedRunLogger`:
every item is written to a spool folder first and sent from a background thread with bounded backoff, so a
tracking server that goes away neither stops training nor loses a metric.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from rwray.config import Config
from rwray.errors import RunInUse, TrackingError

PARAM_BATCH = 100  # MLflow accepts at most 100 params per log_batch call


def resolve_uri(cfg: Config) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else an absolute sqlite path under output_dir."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if cfg.remote_output:
        raise TrackingError(f"output_dir is {cfg.output_dir}: a local MLflow store cannot live there. Set "
                            f"tracking.uri (or MLFLOW_TRACKING_URI) to your MLflow server, e.g. the head node's.")
    return f"sqlite:///{(Path(cfg.output_dir).resolve() / 'mlflow.db')}"


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


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


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


INTERRUPTIONS = (KeyboardInterrupt, SystemExit)  # Ctrl-C, SIGTERM (see launch.Interrupted), `ray job stop`


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
    delay, last = 0.5, None
    while True:
        try:
            with quick_http():
                c = client(uri)
                if error is not None:
                    c.set_tag(run_id, "rwray.error", f"{type(error).__name__}: {error}"[:5000])
                c.set_terminated(run_id, status=status)
            if left:
                print(f"tracking: {left} item(s) of run {run_id} are still unsent in {spool_dir}; they are sent the "
                      f"next time this run name is started", file=sys.stderr, flush=True)
            return True
        except Exception as e:  # noqa: BLE001 - any transport or server error is retried the same way
            last = e
        if time.monotonic() + delay > deadline:
            print(f"tracking: could not mark run {run_id} {status} at {uri} ({type(last).__name__}: "
                  f"{str(last)[:200]}); training itself is unaffected", file=sys.stderr, flush=True)
            return False
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


class RunLogger:
    """Rank 0's handle on the job's run."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self._client = client(uri)

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, name: str) -> None:
        self._client.log_text(self.run_id, text, name)



# ------------------------------------------------------------------------------------------------ transport settings


@contextmanager
def quick_http(retries: int = 0, timeout_s: int = 15) -> Iterator[None]:
    """MLflow's REST client retries 7 times with exponential backoff by default (minutes per call while a server is
    down). Callers that retry on their own schedule turn that off for the duration of the block."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: v for k, v in keys.items() if old[k] is None})  # an explicit user setting wins
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)


# ------------------------------------------------------------------------------------------- run identity / resume

RESUMABLE = ("RUNNING", "SCHEDULED", "KILLED", "FAILED")  # every status but FINISHED
# Fields that may differ between a run and its continuation: where it runs, how it is tracked and retried.
_NOT_IDENTITY = {"resume", "tracking", "scaling", "tune", "reference"}
_NOT_IDENTITY_TRAIN = {"max_failures", "auto_resume"}


def run_name(cfg: Config) -> str:
    return cfg.tracking.run_name or cfg.name


def run_key(cfg: Config) -> str:
    """Tag value naming a run: output_dir + run name (a hash, so any name is a valid filter value)."""
    return hashlib.sha256(f"{cfg.output_dir}\0{run_name(cfg)}".encode()).hexdigest()[:32]


def config_fingerprint(cfg: Config) -> str:
    """Hash of everything that decides what is trained; a run continues only under the same fingerprint."""
    d = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_IDENTITY}
    d["train"] = {k: v for k, v in d["train"].items() if k not in _NOT_IDENTITY_TRAIN}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


@dataclass
class RunHandle:
    run_id: str
    ray_name: str  # the Ray Train run folder under output_dir/ray
    resumed: bool
    checkpoint: str | None = None  # the checkpoint a resumed run continues from
    note: str = ""  # why an existing run of the same name was not continued, if one existed


def _ray_checkpoint(cfg: Config, ray_name: str) -> str | None:
    from rwray.train import checkpoint

    run_dir = cfg.storage("ray", ray_name)
    if not cfg.remote_output:
        found = checkpoint.latest_in(run_dir)
        return str(found) if found else None
    import pyarrow.fs as pafs  # an object store: Ray restores from its snapshot there; existence is enough

    fs, path = pafs.FileSystem.from_uri(f"{run_dir}/{checkpoint.RAY_SNAPSHOT}")
    return run_dir if fs.get_file_info(path).type == pafs.FileType.File else None


def start_or_resume(cfg: Config, uri: str, manifest_sha256: str, extra_tags: Mapping[str, str] = (),
                    auto_resume: bool = True) -> RunHandle:
    """Continue the newest run with this output_dir + run name when it is unfinished, has the same configuration
    and parent, and Ray recorded a checkpoint for it; otherwise start a new run. The caller holds `RunLock`."""
    tags = dict(extra_tags)
    key, fp = run_key(cfg), config_fingerprint(cfg)
    c = client(uri)
    note = ""
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None and auto_resume and cfg.resume is None:
        newest = c.search_runs([exp.experiment_id], f"tags.`rwray.run_key` = '{key}'", max_results=1,
                               order_by=["attributes.start_time DESC"])
        if newest:
            old = newest[0]
            t = old.data.tags
            ckpt = _ray_checkpoint(cfg, t["rwray.ray_run"]) if t.get("rwray.ray_run") else None
            if old.info.status not in RESUMABLE:
                note = ""  # the previous run finished: a new run of the same name is the normal case
            elif t.get("rwray.config_sha256") != fp:
                note = f"run {old.info.run_id[:8]} has the same name but a different configuration"
            elif t.get("mlflow.parentRunId") != tags.get("mlflow.parentRunId"):
                note = f"run {old.info.run_id[:8]} belongs to another sweep or table"
            elif ckpt is None:
                note = f"run {old.info.run_id[:8]} stopped before its first checkpoint"
            else:
                n = int(t.get("rwray.resumes", "0")) + 1
                c.update_run(old.info.run_id, status="RUNNING")
                c.set_tag(old.info.run_id, "rwray.resumes", str(n))
                c.set_tag(old.info.run_id, "rwray.resumed_from", Path(ckpt).name)
                if "rwray.error" in t:  # the interruption is history now, not the run's outcome
                    c.set_tag(old.info.run_id, f"rwray.interrupted.{n}", t["rwray.error"])
                    c.delete_tag(old.info.run_id, "rwray.error")
                return RunHandle(old.info.run_id, t["rwray.ray_run"], True, ckpt)
            if note and old.info.status == "RUNNING" and not cfg.remote_output:
                # RunLock is held by us, so no driver runs it (a remote output_dir has no lock: leave it alone)
                c.set_tag(old.info.run_id, "rwray.error", f"abandoned: a new run of the same name started ({note})")
                c.set_terminated(old.info.run_id, status="KILLED")
    tags.update({"rwray.run_key": key, "rwray.config_sha256": fp})
    run_id = start_run(cfg, uri, manifest_sha256, tags)
    ray_name = f"{run_name(cfg)}-{run_id[:8]}"
    c.set_tag(run_id, "rwray.ray_run", ray_name)
    return RunHandle(run_id, ray_name, False, None, note)


class RunLock:
    """One driver per (output_dir, run name) at a time: without it, two drivers could continue the same unfinished
    run. An flock on a file under output_dir/ray/.locks, released by the kernel when the process dies (SIGKILL
    included), so a crashed driver never blocks the next start. Local output_dir only."""

    def __init__(self, cfg: Config):
        self.path = None if cfg.remote_output else Path(cfg.storage("ray", ".locks", f"{run_key(cfg)}.lock"))
        self.name, self._fd = run_name(cfg), None

    def __enter__(self) -> "RunLock":
        if self.path is None:
            return self
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunInUse(f"run {self.name!r} in {self.path.parent.parent.parent} is being trained by another "
                           f"process (pid {holder}). Fix: wait for it to finish, or give this run another "
                           f"tracking.run_name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


# ---------------------------------------------------------------------------------------- buffered, durable logging

SENTINEL = "train/loss"  # logged last in every epoch batch: its history says which epochs are complete


class BufferedRunLogger:
    """Rank 0's logger: every item is written to ``spool_dir`` (one JSON file, artifacts copied beside it) and a
    background thread sends items in order, retrying with exponential backoff (0.5 s doubling to ``max_backoff_s``)
    while the server is unreachable. Training never waits on the network and never sees a tracking error.

    Exactly once per epoch: `log_epoch` drops an epoch that is already logged on the server or pending in the spool
    (a re-run epoch after a restart, a backfill from the checkpoint), and a batch re-sent after a lost response
    carries the same timestamps, which the MLflow store deduplicates. Items left by a worker that died are found
    in the spool and sent by the next logger on the same run.
    """

    def __init__(self, uri: str, run_id: str, spool_dir: str | Path, max_backoff_s: float = 30.0,
                 verbose: bool = True):
        self.uri, self.run_id, self.spool = uri, run_id, Path(spool_dir)
        for attempt in range(3):  # another run's logger may remove the shared parent as it empties (close)
            try:
                self.spool.mkdir(parents=True, exist_ok=True)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        self.max_backoff_s, self.verbose = max_backoff_s, verbose
        self._cv = threading.Condition()
        self._pending: list[Path] = sorted(self.spool.glob("*.json"))  # a dead predecessor's items go first
        self._claimed = {e for e in (self._read(p).get("epoch") for p in self._pending) if e is not None}
        self._seq = max((int(p.stem) for p in self._pending), default=-1) + 1
        self._server_epochs: set[int] | None = None
        self._stop = threading.Event()
        self._busy = False
        self.sent = self.failures = 0
        self._outage_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="rwray-tracking", daemon=True)
        self._thread.start()

    # ----- producer side (the training thread) ------------------------------------------------------------------
    def log_epoch(self, epoch: int, values: Mapping[str, float], timestamp_ms: int | None = None) -> bool:
        """Queue one epoch's metrics at step=epoch; False when that epoch is already logged or queued."""
        with self._cv:
            if epoch in self._claimed:
                return False
            self._claimed.add(epoch)
        self._put({"kind": "metrics", "epoch": int(epoch), "step": int(epoch), "ts": _ms(timestamp_ms),
                   "values": {k: float(v) for k, v in values.items()}})
        return True

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        self._put({"kind": "metrics", "epoch": None, "step": int(step), "ts": _ms(None),
                   "values": {k: float(v) for k, v in values.items()}})

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._put({"kind": "artifact", "artifact_path": artifact_path}, attach=Path(path))

    def text(self, text: str, name: str) -> None:
        self._put({"kind": "text", "name": name, "text": text})

    def pending(self) -> int:
        with self._cv:
            return len(self._pending) + self._busy

    def close(self, timeout_s: float = 300.0) -> int:
        """Wait up to ``timeout_s`` for everything to be sent; returns how many items stay in the spool."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while (self._pending or self._busy) and time.monotonic() < deadline:
                self._cv.wait(min(1.0, max(deadline - time.monotonic(), 0.01)))
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        self._thread.join(timeout=30)
        left = self.pending()
        if left == 0:
            shutil.rmtree(self.spool, ignore_errors=True)  # an empty spool leaves nothing behind
            with contextlib.suppress(OSError):
                self.spool.parent.rmdir()  # tracking-spool/ itself, when no other run has items waiting
        elif self.verbose:
            print(f"tracking: {left} item(s) for run {self.run_id} could not be sent to {self.uri} within "
                  f"{timeout_s:.0f} s; kept in {self.spool} and sent when this run is next started or finished",
                  file=sys.stderr, flush=True)
        return left

    def _put(self, item: dict[str, Any], attach: Path | None = None) -> None:
        with self._cv:
            seq = self._seq
            self._seq += 1
        if attach is not None:  # copied now: the caller's file is usually in a temporary folder
            folder = self.spool / f"{seq:09d}.d"
            folder.mkdir(exist_ok=True)
            shutil.copy2(attach, folder / attach.name)
            item["file"] = f"{folder.name}/{attach.name}"
        path = self.spool / f"{seq:09d}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(item))
        os.replace(tmp, path)  # atomic: the sender (or a successor) never reads half an item
        with self._cv:
            self._pending.append(path)
            self._cv.notify_all()

    # ----- consumer side (the background thread) ----------------------------------------------------------------
    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def _run(self) -> None:
        delay = 0.5
        with quick_http(timeout_s=120):  # this thread retries on its own schedule; uploads may be slow
            c = client(self.uri)
            while True:
                with self._cv:
                    while not self._pending and not self._stop.is_set():
                        self._cv.wait(1.0)
                    if not self._pending:
                        return
                    path = self._pending[0]
                    self._busy = True
                try:
                    self._send(c, path)
                except Exception as e:  # noqa: BLE001 - retried whatever it is (network, 5xx, sqlite locked)
                    self.failures += 1
                    if self._outage_since is None:
                        self._outage_since = time.monotonic()
                        if self.verbose:
                            print(f"tracking: cannot log to {self.uri} ({type(e).__name__}: {str(e)[:160]}); "
                                  f"buffering in {self.spool} and retrying", file=sys.stderr, flush=True)
                    with self._cv:
                        self._busy = False
                        self._cv.notify_all()
                    if self._stop.wait(delay):
                        return
                    delay = min(delay * 2, self.max_backoff_s)
                    continue
                with self._cv:
                    self._pending.pop(0)
                    self._busy = False
                    self._cv.notify_all()
                self.sent += 1
                delay = 0.5
                if self._outage_since is not None:
                    if self.verbose:
                        print(f"tracking: {self.uri} reachable again after {time.monotonic() - self._outage_since:.0f}"
                              f" s; sending the buffered items", file=sys.stderr, flush=True)
                    self._outage_since = None

    def _send(self, c, path: Path) -> None:
        from mlflow.entities import Metric

        item = self._read(path)
        kind = item.get("kind")
        if kind == "metrics":
            epoch = item.get("epoch")
            if epoch is not None:
                if self._server_epochs is None:
                    self._server_epochs = {m.step for m in c.get_metric_history(self.run_id, SENTINEL)}
                if epoch in self._server_epochs:
                    return self._done(path)
            values = item["values"]
            keys = sorted(values, key=lambda k: k == SENTINEL)  # the sentinel goes in the last request
            ms = [Metric(k, values[k], item["ts"], item["step"]) for k in keys]
            for i in range(0, len(ms), 1000):  # MLflow's per-request limit
                c.log_batch(self.run_id, metrics=ms[i:i + 1000])
            if epoch is not None:
                self._server_epochs.add(epoch)
        elif kind == "artifact":
            c.log_artifact(self.run_id, str(self.spool / item["file"]), item.get("artifact_path"))
        elif kind == "text":
            c.log_text(self.run_id, item["text"], item["name"])
        self._done(path)

    def _done(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        shutil.rmtree(path.with_suffix(".d"), ignore_errors=True)


def _ms(timestamp_ms: int | None) -> int:
    return int(timestamp_ms) if timestamp_ms is not None else int(time.time() * 1000)


def spool_dir(cfg: Config, run_id: str) -> str:
    """Where a run's unsent tracking items wait: under output_dir (local), else the node's temporary folder."""
    import tempfile

    root = Path(cfg.output_dir) if not cfg.remote_output else Path(tempfile.gettempdir()) / "rwray"
    return str(root / "tracking-spool" / run_id)


def replay(uri: str, run_id: str, spool: str | Path, timeout_s: float = 120.0) -> int:
    """Send what a spool folder still holds (a worker that died or gave up); returns how many items are left."""
    spool = Path(spool)
    if not spool.is_dir():
        return 0
    if not any(spool.glob("*.json")):
        shutil.rmtree(spool, ignore_errors=True)
        with contextlib.suppress(OSError):
            spool.parent.rmdir()
        return 0
    return BufferedRunLogger(uri, run_id, spool, max_backoff_s=10.0, verbose=False).close(timeout_s)
