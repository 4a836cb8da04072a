"""Peak memory of a process and everything it starts, by kind of process, read from Linux's /proc.

A command such as `rwray train` starts Ray, whose raylet starts the train workers, the decoding actors and Ray
Data's tasks: all of them descendants of the command's process. `PeakWatch` walks that tree every ``every_s``
seconds and keeps, per process, the kernel's own high-water mark of its resident memory (``VmHWM`` in
/proc/<pid>/status: the peak since the process started, so a sample taken any time before the process ends sees the
peak so far; only growth in its last ``every_s`` before it exits can be missed) and what it was (its title:
Ray names its workers ``ray::RayTrainWorker...``, ``ray::_Decoder...``).

A leaf: imports nothing from rwray. Linux only (on other systems it records nothing and says so).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

# Process kinds by what their title starts with, most specific first. A Ray pool worker takes the title of the task
# it runs, so a process is named by the most telling kind any of its titles named (PRIORITY).
KINDS = (
    ("ray::RayTrainWorker", "train worker"),
    ("ray::_Decoder", "decoding actor"),
    ("ray::_Scorer", "scoring actor"),
    ("ray::TrainController", "train controller"),
    ("ray::RuntimeEnvAgent", "Ray system process"),
    ("ray::DashboardAgent", "Ray system process"),
    ("ray::ReadParquet", "Ray Data task"),
    ("ray::Map", "Ray Data task"),
    ("ray::", "other Ray worker"),
)
# Ray's own daemons, by their program (raylet, gcs_server) or script
SYSTEM = ("/raylet", "/gcs_server", "log_monitor.py", "dashboard.py", "autoscaler/_private/monitor.py", "agent.py")


def kind_of(title: str) -> str | None:
    """The kind of process a title names, or None while it names none yet (a Ray worker that has not taken a task:
    ``ray::IDLE``, or one still starting)."""
    for prefix, kind in KINDS:
        if title.startswith(prefix):
            return None if title.startswith("ray::IDLE") else kind
    program = title.split(" ", 3)[:3]  # the program, or the interpreter, maybe a flag, and the script
    if any(s in word for word in program for s in SYSTEM):
        return "Ray system process"
    if any(word.endswith(("default_worker.py", "setup_worker.py")) for word in program):
        return None
    return "other process"


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def peak_rss(pid: int) -> int | None:
    """The process's peak resident memory in bytes (VmHWM), None when it is gone or unreadable."""
    status = _read(f"/proc/{pid}/status")
    if status is None:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return None


def title(pid: int) -> str:
    """What the process calls itself: its argv joined (Ray rewrites argv[0] to ``ray::<Class>.<method>``)."""
    raw = _read(f"/proc/{pid}/cmdline") or ""
    return " ".join(p for p in raw.split("\0") if p)


def children(pids: dict[int, int]) -> dict[int, list[int]]:
    """parent pid -> child pids, for every process in /proc (``pids`` is reused as pid -> parent)."""
    out: dict[int, list[int]] = {}
    pids.clear()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _read(f"/proc/{name}/stat")
        if stat is None:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        pids[int(name)] = ppid
        out.setdefault(ppid, []).append(int(name))
    return out


# When a process was seen under several kinds (a pool worker runs a task, then becomes an actor), the first of this
# list names it.
PRIORITY = ("driver", "train worker", "decoding actor", "scoring actor", "train controller", "Ray Data task",
            "Ray system process", "other Ray worker", "other process")


@dataclass
class Seen:
    """One process of the tree."""

    pid: int
    kinds: set[str] = field(default_factory=set)  # every kind its titles named
    peak: int = 0  # bytes

    @property
    def kind(self) -> str:
        return next((k for k in PRIORITY if k in self.kinds), "idle Ray worker")


@dataclass
class PeakWatch:
    """Watches the tree under ``root`` (a pid) from `start` to `stop`; ``seen`` holds every process it met."""

    root: int
    every_s: float = 0.2
    seen: dict[int, Seen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rwray-memwatch", daemon=True)
        self.supported = os.path.isdir("/proc") and peak_rss(os.getpid()) is not None

    def start(self) -> "PeakWatch":
        if self.supported:
            self._thread.start()
        return self

    def stop(self) -> None:
        if self.supported:
            self._stop.set()
            self._thread.join()
            self.sample()  # what finished since the last tick

    def __enter__(self) -> "PeakWatch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def sample(self) -> None:
        tree = children({})
        todo, tree_pids = [self.root], []
        while todo:
            pid = todo.pop()
            tree_pids.append(pid)
            todo += tree.get(pid, [])
        for pid in tree_pids:
            peak = peak_rss(pid)
            if peak is None:
                continue
            entry = self.seen.setdefault(pid, Seen(pid, {"driver"} if pid == self.root else set()))
            if (kind := kind_of(title(pid))) is not None:  # a pool worker's title changes with its task
                entry.kinds.add(kind)
            entry.peak = max(entry.peak, peak)

    def peaks(self) -> dict[str, list[int]]:
        """kind -> the peak of each process of that kind (bytes), largest first."""
        out: dict[str, list[int]] = {}
        for s in self.seen.values():
            out.setdefault(s.kind, []).append(s.peak)
        return {k: sorted(v, reverse=True) for k, v in out.items()}
