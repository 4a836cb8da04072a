"""What a finished run left in MLflow and when: rows and bytes in the tracking store, bytes of its artifacts (and of
its logged model's), and the times its stages ended as the store recorded them. `rwray rehearse` reports these for
every job, since they grow with classes, epochs and workers.

Row counts read a local sqlite store directly (MLflow's own tables: metrics, latest_metrics, params, tags); for a
server they are left out. Artifact bytes are counted where the artifacts are local files.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from rwray.tracking.transport import client

ROW_TABLES = ("metrics", "latest_metrics", "params", "tags")


@dataclass
class Footprint:
    store_bytes: int | None  # the sqlite file (with its -wal and -shm), None for a server
    rows: dict[str, int]  # table -> this run's rows
    metric_keys: int  # distinct metric names the run logged
    artifact_bytes: dict[str, int]  # top-level artifact folder (or file) -> bytes; "model" for the logged model
    times: dict[str, int] = field(default_factory=dict)  # what ended when, epoch ms (see `timeline`)


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def local_path(uri: str | None) -> Path | None:
    """The folder a file:// (or plain path) artifact URI names, None for anything remote."""
    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_footprint(uri: str, run_id: str) -> Footprint:
    c = client(uri)
    run = c.get_run(run_id)
    rows, keys, size = {}, len(run.data.metrics), None
    db = sqlite_path(uri)
    if db is not None and db.is_file():
        size = sum(os.path.getsize(p) for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.is_file())
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            for table in ROW_TABLES:
                rows[table] = con.execute(f"SELECT COUNT(*) FROM {table} WHERE run_uuid = ?", (run_id,)).fetchone()[0]
    artifacts: dict[str, int] = {}
    root = local_path(run.info.artifact_uri)
    if root is not None and root.is_dir():
        artifacts = {p.name: folder_bytes(p) for p in sorted(root.iterdir())}
    model = logged_model_of(c, run)
    if model is not None and (where := local_path(model.artifact_location)) is not None and where.exists():
        artifacts["model"] = folder_bytes(where)
    return Footprint(size, rows, keys, artifacts, timeline(c, run, model, root))


def logged_model_of(c, run):
    outputs = run.outputs.model_outputs if run.outputs else []
    return c.get_logged_model(outputs[-1].model_id) if outputs else None


def timeline(c, run, model, artifacts: Path | None) -> dict[str, int]:
    """When each part of a run ended, in epoch ms, as the store has it: ``start``; ``epochs`` (the last epoch's
    metrics, stamped when the epoch ended); ``artifacts`` (the newest final artifact file: the last weights, the
    evaluation folder); ``model`` (the logged model); ``registered`` (its registry version); ``end``."""
    out = {"start": run.info.start_time}
    history = c.get_metric_history(run.info.run_id, "best/epoch")  # every epoch logs it, trained or evaluated
    if history:
        out["epochs"] = max(m.timestamp for m in history)
    finals = [p for d in ("evaluation", "checkpoints/last") if artifacts is not None and (artifacts / d).is_dir()
              for p in (artifacts / d).rglob("*") if p.is_file()]
    if finals:
        out["artifacts"] = int(max(p.stat().st_mtime for p in finals) * 1000)
    if model is not None:
        out["model"] = model.last_updated_timestamp
        versions = c.search_model_versions(f"run_id = '{run.info.run_id}'")
        if versions:
            out["registered"] = max(v.creation_timestamp for v in versions)
    if run.info.end_time:
        out["end"] = run.info.end_time
    return out
