"""Buffered, durable logging for rank 0: a tracking server that goes away neither stops training nor loses a metric.

Every item is written to a spool folder first and sent from a background thread with bounded backoff
(`rwray.tracking.transport.retry`); what is still there when a worker dies or gives up is sent by the next logger on
the same run, or by `replay` when the driver starts or finishes the run (see docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from rwray import output
from rwray.config import Config
from rwray.metrics import TRAIN_LOSS
from rwray.tracking.transport import client, quick_http, retry

SENTINEL = TRAIN_LOSS  # logged last in every epoch batch: its history says which epochs are complete


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
            output.say(f"tracking: {left} item(s) for run {self.run_id} could not be sent to {self.uri} within "
                       f"{timeout_s:.0f} s; kept in {self.spool} and sent when this run is next started or finished")
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
        """Send the oldest item until it goes through (retried whatever the error: network, 5xx, sqlite locked),
        then the next; a `close` ends the backoff wait and the thread."""
        with quick_http(timeout_s=120):  # this thread retries on its own schedule; uploads may be slow
            c = client(self.uri)
            while (path := self._next()) is not None:
                if not retry(lambda: self._attempt(c, path), self._stop.wait, self.max_backoff_s, self._failed):
                    return
                self._sent(path)

    def _next(self) -> Path | None:
        """The oldest unsent item, waiting for one; None once closed with nothing left."""
        with self._cv:
            while not self._pending and not self._stop.is_set():
                self._cv.wait(1.0)
            return self._pending[0] if self._pending else None

    def _attempt(self, c, path: Path) -> None:
        with self._cv:
            self._busy = True
        self._send(c, path)

    def _failed(self, e: Exception) -> None:
        self.failures += 1
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            if self.verbose:
                output.say(f"tracking: cannot log to {self.uri} ({type(e).__name__}: {str(e)[:160]}); "
                           f"buffering in {self.spool} and retrying")
        with self._cv:
            self._busy = False
            self._cv.notify_all()

    def _sent(self, path: Path) -> None:
        with self._cv:
            self._pending.pop(0)
            self._busy = False
            self._cv.notify_all()
        self.sent += 1
        if self._outage_since is not None:
            if self.verbose:
                output.say(f"tracking: {self.uri} reachable again after {time.monotonic() - self._outage_since:.0f}"
                           f" s; sending the buffered items")
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
