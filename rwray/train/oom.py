"""An out-of-memory kill as Ray reports it: the fields of its text, and where it sits among Ray's wrappers.

Ray's memory monitor (the raylet) kills a worker process when its node's memory use passes
``RAY_memory_usage_threshold`` (0.95 of the node by default, read when Ray starts). The caller of that process's
task or actor then gets ``ray.exceptions.OutOfMemoryError`` (or, for an actor in older Rays, an ``ActorDiedError``
whose text says so), whose message is Ray's report: the node's memory, the threshold, the process(es) it killed and
the node's largest processes. Ray's wording changed over versions (2.56 reworded the report); `parse` reads both
forms and leaves a field None where the text does not say it. Ray's own text is kept for the run's log file.

What to tell the user (which process, where the run was, what to change) is `rwray.train.oom_report`'s.
Imported by Ray Train's controller (`rwray.train.fatal`): nothing here imports more than `rwray.errors` at import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from rwray.errors import OutOfMemory

GIB = float(1 << 30)  # Ray's "GB" in these reports is bytes / 2**30
OOM_MARKERS = ("running low on memory", "NODE_OUT_OF_MEMORY", "OOM kill reason")

_NUM = r"\d+(?:\.\d+)?"
_NODE = re.compile(r"Memory on the node \(IP: (?P<ip>[^,()\s]+), ID: \w+\)")
_NODE_NEW = re.compile(rf"was (?P<used>{_NUM}) ?GB used / (?P<total>{_NUM}) ?GB limit")
_NODE_OLD = re.compile(rf"was running was (?P<used>{_NUM}) ?GB / (?P<total>{_NUM}) ?GB \({_NUM}\),? which exceeds the "
                       rf"memory usage threshold of (?P<thr>{_NUM})")
_REASON = re.compile(r"Memory usage (?P<used>\d+) ?B exceeded threshold of (?P<thr>\d+) ?B \([\d.]+% of "
                     r"(?P<total>\d+) ?B limit\)")
_SELECTED = re.compile(r"Selected to kill: \((?P<body>.*?)worker ID=", re.S)  # 2.56+: one per process killed
_TASK_OLD = re.compile(rf"where the task \((?:task|actor) ID: \w+, name=(?P<name>[^,]+), pid=(?P<pid>\d+), "
                       rf"memory used=(?P<used>{_NUM}) ?GB\)")
_TOP = re.compile(rf"^\s*(?P<pid>\d+)\s+(?P<gib>{_NUM})\s+(?P<cmd>\S.*)$", re.M)


@dataclass
class Kill:
    """One memory-monitor kill as Ray's text reports it. Bytes are ints; a field the text lacks is None/empty."""

    pid: int | None = None
    name: str = ""  # the task's, or the actor's creation task's: RayTrainWorker.__init__, _Decoder.__init__, ...
    command: str = ""  # its process title in Ray's top-10 list: ray::RayTrainWorker, ray::ReadParquet, ...
    used: int | None = None  # the killed process's memory
    node_ip: str = ""
    node_used: int | None = None
    node_total: int | None = None
    threshold: float | None = None  # the kill threshold, a fraction of node_total
    top: list[tuple[int, float, str]] = field(default_factory=list)  # the node's largest: (pid, GiB, command)
    # Ray 2.56+ may kill several processes at once: the others, (pid, name, bytes); the one above used the most
    also: list[tuple[int, str, int | None]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "name": self.name, "command": self.command, "used": self.used,
                "node_ip": self.node_ip, "node_used": self.node_used, "node_total": self.node_total,
                "threshold": self.threshold, "top": [list(t) for t in self.top], "also": [list(t) for t in self.also]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Kill":
        return cls(**{**{k: d.get(k) for k in ("pid", "used", "node_used", "node_total", "threshold")},
                      "name": d.get("name") or "", "command": d.get("command") or "", "node_ip": d.get("node_ip") or "",
                      "top": [tuple(t) for t in d.get("top") or []], "also": [tuple(t) for t in d.get("also") or []]})


def is_oom_text(text: str) -> bool:
    return any(m in text for m in OOM_MARKERS)


def _gib(value: str) -> int:
    return int(float(value) * GIB)


def _entry(body: str) -> tuple[int | None, str, int | None]:
    """(pid, task name, bytes used) of one "Selected to kill" entry."""
    name, pid, used = re.search(r"task name=([^,]+)", body), re.search(r"\bpid=(\d+)", body), re.search(
        rf"memory used=({_NUM}) ?GB", body)
    return (int(pid[1]) if pid else None, name[1].strip() if name else "", _gib(used[1]) if used else None)


def parse(text: str) -> Kill | None:
    """Ray's report of a memory-monitor kill -> its fields; None when the text is not such a report."""
    if not is_oom_text(text):
        return None
    k = Kill()
    if m := _NODE.search(text):
        k.node_ip = m["ip"]
    if m := _REASON.search(text):  # exact bytes (2.56+)
        k.node_used, k.node_total = int(m["used"]), int(m["total"])
        k.threshold = int(m["thr"]) / k.node_total
    elif m := _NODE_OLD.search(text):
        k.node_used, k.node_total, k.threshold = _gib(m["used"]), _gib(m["total"]), float(m["thr"])
    if k.node_used is None and (m := _NODE_NEW.search(text)):
        k.node_used, k.node_total = _gib(m["used"]), _gib(m["total"])
    if selected := [_entry(m["body"]) for m in _SELECTED.finditer(text)]:
        selected.sort(key=lambda e: -(e[2] or 0))  # the largest first: the likeliest cause
        (k.pid, k.name, k.used), k.also = selected[0], selected[1:]
    elif m := _TASK_OLD.search(text):
        k.name, k.pid, k.used = m["name"].strip(), int(m["pid"]), _gib(m["used"])
    else:  # an ActorDiedError's own lines: "\tpid: 1412", "\tclass_name: X", "\tip: 10.0.0.1"
        if n := re.search(r"^\s*pid: (\d+)", text, re.M):
            k.pid = int(n[1])
        if n := re.search(r"^\s*class_name: (\S+)", text, re.M):
            k.name = n[1]
        if not k.node_ip and (n := re.search(r"^\s*ip: (\S+)", text, re.M)):
            k.node_ip = n[1]
    if (at := text.find("memory users:")) >= 0:
        block = text[at:].split("\n", 1)[-1]
        for m in _TOP.finditer(block.split("\n\n", 1)[0]):
            k.top.append((int(m["pid"]), float(m["gib"]), m["cmd"].strip()))
    k.command = next((cmd for pid, _, cmd in k.top if pid == k.pid), "")
    return k


# ------------------------------------------------------------------------------------------- finding it in errors


def _children(err: BaseException) -> Iterator[tuple[int | None, BaseException]]:
    """The exceptions Ray wraps inside ``err``, with the worker rank where Ray names one."""
    failures = getattr(err, "worker_failures", None)  # WorkerGroupError: {rank: error}
    if isinstance(failures, dict):
        for rank, e in failures.items():
            if isinstance(e, BaseException):
                yield rank, e
    for attr in ("controller_failure", "health_check_failure", "_base_exc", "cause", "error", "__cause__",
                 "__context__"):
        e = getattr(err, attr, None)
        if isinstance(e, BaseException):
            yield None, e


def is_oom(err: BaseException) -> bool:
    """A process killed for memory (Ray's report), a Python MemoryError, or our own report of either."""
    if isinstance(err, MemoryError):
        from rwray.errors import BatchTooLarge

        return not isinstance(err, BatchTooLarge)  # out of accelerator memory: its own error and advice
    try:
        from ray.exceptions import OutOfMemoryError
    except ImportError:  # pragma: no cover - Ray is a dependency
        OutOfMemoryError = ()  # type: ignore[assignment]
    if isinstance(err, OutOfMemoryError):
        return True
    try:
        return is_oom_text(str(err))
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails is not ours to judge
        return False


def find(err: BaseException, rank: int | None = None, _seen: set[int] | None = None
         ) -> tuple[int | None, BaseException] | None:
    """The innermost out-of-memory error inside ``err`` (Ray's own rather than a wrapper quoting its text; ranks in
    order), with the worker rank it came from where Ray said. ``rank``: the rank an outer wrapper named."""
    seen = set() if _seen is None else _seen
    if id(err) in seen:
        return None
    seen.add(id(err))
    for child_rank, child in _children(err):
        if (hit := find(child, child_rank if child_rank is not None else rank, seen)) is not None:
            return hit
    return (rank, err) if is_oom(err) else None


def in_failures(worker_exceptions: dict[int, BaseException]) -> tuple[int | None, BaseException] | None:
    """The first out-of-memory error among Ray Train's per-rank worker errors, with its rank."""
    for rank, err in sorted(worker_exceptions.items()):
        if (hit := find(err, rank)) is not None:
            return hit
    return None


def kill_of(err: BaseException) -> tuple[Kill | None, str]:
    """(the parsed kill or None, Ray's text) of an out-of-memory error, ours or Ray's."""
    if isinstance(err, OutOfMemory):
        d = err.details
        return (Kill.from_dict(d["kill"]) if d.get("kill") else None), d.get("ray_text", "")
    text = str(err)
    return parse(text), text
