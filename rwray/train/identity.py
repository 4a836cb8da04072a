"""Which run a job is: its MLflow run, its Ray Train folder, and whether it continues an unfinished one.

A run is identified by (output_dir, run name): `start_or_resume` continues an unfinished run of the same name and
configuration instead of creating a new one (see docs/reliability.md), from the checkpoint Ray Train recorded for
it. The only module that knows both the MLflow tags and Ray's checkpoint layout.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from rwray.config import Config
from rwray.errors import RunInUse
from rwray.paths import ray_safe
from rwray.tracking.store import start_run
from rwray.tracking.transport import client
from rwray.train import checkpoint

RESUMABLE = ("RUNNING", "SCHEDULED", "KILLED", "FAILED")  # every status but FINISHED
# Fields that may differ between a run and its continuation: where it runs, how it is tracked and retried.
_NOT_IDENTITY = {"resume", "tracking", "scaling", "tune", "reference"}
_NOT_IDENTITY_TRAIN = {"max_failures", "auto_resume", "checkpoint_every"}


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
    ray_name: str  # the Ray Train run name and folder under output_dir/ray: ASCII (`ray_safe`), MLflow's is real
    resumed: bool
    checkpoint: str | None = None  # the checkpoint a resumed run continues from
    note: str = ""  # why an existing run of the same name was not continued, if one existed


def ray_checkpoint(cfg: Config, ray_name: str) -> str | None:
    """The checkpoint Ray Train would restore the run folder output_dir/ray/<ray_name> from, or None."""
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
            ckpt = ray_checkpoint(cfg, t["rwray.ray_run"]) if t.get("rwray.ray_run") else None
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
    ray_name = f"{ray_safe(run_name(cfg))}-{run_id[:8]}"  # Ray takes ASCII run names only
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
