"""What the terminal shows: rwray's own lines. Everything Ray and MLflow log goes to a file.

A run's terminal carries one start line, one line per epoch, the warnings that matter and the final table. The
rest (Ray's start-up and autoscaler lines, Ray Train's per-report dumps, Ray Data's per-execution lines, MLflow's
database migrations, worker tracebacks) is kept, in the log file the start line names: ``<output_dir>/logs/<run>.log``.

How lines travel: a Ray worker's stdout reaches the driver through Ray's log stream. A worker marks rwray's lines
with `MARK` (`worker_line`); the driver's handler on that stream (`attach_ray`) shows marked lines and files the rest.
The driver's own Python loggers (ray, mlflow, alembic, warnings) are pointed at the same file.

``--verbose`` (or ``RWRAY_VERBOSE=1``, e.g. through ``ray job submit --runtime-env-json``) leaves Ray's and MLflow's
output on the terminal as they print it. Nothing here is active unless a command called `setup`: rwray used as a
library logs the way Ray and MLflow do by default.

A leaf: imports nothing from rwray.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, TextIO

MARK = "[rwray] "  # starts every line a worker means for the user's terminal
VERBOSE_ENV = "RWRAY_VERBOSE"
CAPTURED_LOGGERS = ("ray", "mlflow", "alembic", "py.warnings", "urllib3", "filelock", "fsspec")


def verbose_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class _Capture:
    """The driver's state: where other people's lines go, and how rwray's lines are shown."""

    def __init__(self, show: Callable[[str], None]):
        self.show = show
        self.lock = threading.Lock()
        self.file: TextIO | None = None
        self.path: Path | None = None
        self.pending: list[str] = []  # lines logged before the first log file was named
        self.handler = _FileHandler(self)
        self.saved: dict[str, tuple[list[logging.Handler], bool]] = {}

    def write(self, text: str) -> None:
        with self.lock:
            if self.file is None:
                self.pending.append(text)
                del self.pending[:-10_000]  # bounded: a command that never names a file keeps the newest lines
            else:
                self.file.write(text)
                self.file.flush()

    def log_to(self, path: Path) -> None:
        with self.lock:
            if self.path == path:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            old, self.file, self.path = self.file, open(path, "a", encoding="utf-8"), path
            if old is not None:
                old.close()
            self.file.writelines(self.pending)
            self.file.flush()
            self.pending.clear()

    def grab_loggers(self) -> None:
        """Point the driver's Ray / MLflow loggers at the file: their own console handlers go, their records
        propagate to the root logger, where the file handler is. (ray.init(configure_logging=False) clears the
        "ray" logger's handlers: a handler of ours there would not survive it.)"""
        logging.captureWarnings(True)
        root = logging.getLogger()
        if self.handler not in root.handlers:
            root.addHandler(self.handler)
        # The named loggers and every logger under them that configured itself (Ray Data's "ray.data" has its own
        # console handler and does not propagate).
        names = [n for n in list(logging.root.manager.loggerDict)
                 if any(n == c or n.startswith(c + ".") for c in CAPTURED_LOGGERS)]
        for name in dict.fromkeys([*CAPTURED_LOGGERS, *names]):
            lg = logging.getLogger(name)
            if name not in self.saved:
                self.saved[name] = (list(lg.handlers), lg.propagate)
            for h in list(lg.handlers):
                lg.removeHandler(h)
            lg.propagate = True

    def close(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        for name, (handlers, propagate) in self.saved.items():
            lg = logging.getLogger(name)
            for h in handlers:
                lg.addHandler(h)
            lg.propagate = propagate
        logging.captureWarnings(False)
        with self.lock:
            if self.file is not None:
                self.file.close()
            self.file, self.path = None, None


class _FileHandler(logging.Handler):
    def __init__(self, cap: _Capture):
        super().__init__(logging.DEBUG)
        self.cap = cap
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.cap.write(self.format(record) + "\n")
        except Exception:  # a log line must never break a run
            self.handleError(record)


_capture: _Capture | None = None


def setup(verbose: bool, show: Callable[[str], None] | None = None) -> bool:
    """Called once by a command: route other people's logs to a file unless verbose. -> whether captured."""
    global _capture
    if verbose_requested(verbose):
        return False
    import mlflow  # noqa: F401  each configures its loggers when first imported: take them over after that
    import ray  # noqa: F401
    import ray.data  # noqa: F401
    if _capture is None:
        _capture = _Capture(show or (lambda line: print(line, file=sys.stderr, flush=True)))
    _capture.grab_loggers()
    return True


def teardown() -> None:
    global _capture
    if _capture is not None:
        _capture.close()
        _capture = None


def captured() -> bool:
    return _capture is not None


def log_to(path: str | Path) -> Path | None:
    """Where this command's captured logs go from now on (appended). -> the path, or None when not captured."""
    if _capture is None:
        return None
    _capture.log_to(Path(path))
    return _capture.path


def say(line: str) -> None:
    """One of rwray's own lines: shown by the driver; from inside a Ray worker (a Tune trial's driver is one),
    marked for the driver to show."""
    if _capture is not None:
        _capture.show(line)
    elif _in_ray_worker():
        worker_line(line)
    else:
        print(line, file=sys.stderr, flush=True)


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")
    try:
        return ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # no Ray context: a plain process
        return False


def worker_line(line: str) -> None:
    """One of rwray's own lines, from a Ray worker (or a Tune trial's driver, itself a Ray actor): marked, and
    written to the stream, not through print(): Ray Train patches print in its workers to log each line a second
    time through the root logger."""
    sys.stdout.write(f"{MARK}{line}\n")
    sys.stdout.flush()


def route(data: dict[str, Any], show: Callable[[str], None], write: Callable[[str], None],
          autoscaler_events: Callable[[list[str]], Any] = lambda lines: lines, drop: tuple[str, ...] = ()) -> None:
    """One batch of worker output as Ray's driver receives it ({"lines", "pid", "ip", "actor_name", ...}): marked
    lines are shown without the mark, lines holding one of `drop` are dropped, every other line is written with
    its origin."""
    lines = list(data.get("lines", ()))
    who = data.get("actor_name") or data.get("task_name") or "worker"
    head = f"({who} pid={data.get('pid')}, {data.get('ip')}) "
    if data.get("pid") == "autoscaler":  # its events, not its status table every 5 s (Ray filters the same)
        lines, head = list(autoscaler_events(lines)), "(autoscaler) "
    for line in lines:
        at = line.find(MARK)
        if at >= 0:
            show(line[at + len(MARK):])
        elif not any(d in line for d in drop):
            write(head + line + "\n")


def attach_ray(drop: tuple[str, ...] = ()) -> None:
    """After ray.init: file the worker output Ray streams to the driver (less the lines holding one of `drop`),
    show the marked lines. Ray offers no public hook for this; its driver hands every batch of worker lines to
    ``global_worker_stdstream_dispatcher``, whose default handler prints them. Without that (another Ray version)
    Ray's default printing stays."""
    if _capture is None:
        return
    _capture.grab_loggers()
    try:
        from ray._private.worker import filter_autoscaler_events
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    cap = _capture
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("rwray")
    # Stays for as long as Ray does, past `teardown`: workers' lines still arriving after a command ended (a
    # finished run's actors shutting down) must not reach the terminal either; they are kept in memory.
    dispatcher.add_handler("rwray", lambda data: route(data, cap.show, cap.write, filter_autoscaler_events, drop))
