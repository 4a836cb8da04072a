"""An out-of-memory kill, told as what it is: which process (a train worker and its rank, a decoding actor, a Ray
Data task, the controller), how much memory it and its node used, where the run was, what Ray Train's retries did,
and which config fields to change. The facts come from Ray's report (`rwray.train.oom`) and from the per-rank status
records the training loop writes (`rwray.train.progress.status_writer`), matched by pid.

Ray Train's controller builds the first part (`partial`: it has no config) for a retry line or to stop the run;
the driver completes it (`explain`) with the stage in epochs and steps and the config fields, and raises it as
`rwray.errors.OutOfMemory` (no traceback, exit code 1, the MLflow run FAILED). A driver killed by the kernel's OOM
killer cannot report anything (SIGKILL): its MLflow run stays RUNNING and the next start of the job continues it.

Imported by the controller (`rwray.train.fatal`): nothing here imports more than `rwray.errors` at import.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from rwray.errors import OutOfMemory
from rwray.train.oom import GIB, Kill, find, kill_of

EVENT = "was killed"  # by Ray's memory monitor; a Python MemoryError "ran out of memory"


# ------------------------------------------------------------------------------------------------ describing it


def process_kind(kill: Kill | None, rank: int | None) -> str:
    """train worker | decoding actor | Ray Data task | Ray Train controller | Ray worker (by Ray's names)."""
    name = f"{kill.name} {kill.command}" if kill is not None else ""
    if "_Decoder" in name:
        return "decoding actor"
    if "TrainController" in name:
        return "Ray Train controller"
    if re.search(r"ReadParquet|Read\w+|MapBatches|_map_task|MapWorker|ray\.data|Write\w+", name):
        return "Ray Data task"
    if "RayTrainWorker" in name or ((kill is None or not name.strip()) and rank is not None):
        return "train worker"
    return "Ray worker"


def describe_process(kind: str, rank: int | None, kill: Kill | None) -> str:
    pid = f"pid {kill.pid}" if kill is not None and kill.pid else ""
    node = f"node {kill.node_ip}" if kill is not None and kill.node_ip else ""
    where = ", ".join(filter(None, (pid, node)))
    where = f" ({where})" if where else ""
    if kind == "train worker":
        return f"train worker rank {rank}{where}" if rank is not None else f"a train worker{where}"
    if kind == "decoding actor":
        owner = f" of train worker rank {rank}" if rank is not None else ""
        return f"a decoding actor{owner}{where}"
    if kind == "Ray Data task":
        return f"a Ray Data task ({kill.name or kill.command}){where}" if kill else "a Ray Data task"
    if kind == "Ray Train controller":
        return f"the Ray Train controller{where}"
    label = (kill.name or kill.command) if kill is not None else ""
    return f"a Ray worker process{f' ({label})' if label else ''}{where}"


def describe_memory(kill: Kill | None) -> str:
    """The figures, in GiB (as `ray status` and scaling.memory_per_worker_gb count)."""
    if kill is None:
        return "a Python MemoryError (an allocation failed); Ray reported no figures"
    parts = []
    if kill.used is not None:
        parts.append(f"the process used {kill.used / GIB:.1f} GiB")
    if kill.node_used is not None and kill.node_total:
        node = f"node {kill.node_ip}" if kill.node_ip else "its node"
        over = (f", over Ray's kill threshold of {100 * kill.threshold:.0f}% (RAY_memory_usage_threshold, read when "
                f"Ray starts)" if kill.threshold is not None else "")
        parts.append(f"{node} had {kill.node_used / GIB:.1f} of {kill.node_total / GIB:.1f} GiB in use "
                     f"({100 * kill.node_used / kill.node_total:.0f}%){over}")
    if crowded(kill):
        parts.append(f"other processes held {others_gib(kill):.1f} GiB of it (largest: {largest_other(kill)})")
    if kill.also:
        parts.append("Ray also killed " + ", ".join(
            f"{name.split('.')[0] or 'a process'} (pid {pid}{f', {used / GIB:.1f} GiB' if used is not None else ''})"
            for pid, name, used in kill.also))
    return "; ".join(parts) if parts else "Ray's report has no figures (see the log file)"


def brief_memory(kill: Kill | None) -> str:
    """The figures in a few words, for a one-line retry notice."""
    if kill is None:
        return "a Python MemoryError"
    parts = [f"it used {kill.used / GIB:.1f} GiB"] if kill.used is not None else []
    if kill.node_used is not None and kill.node_total:
        thr = f", threshold {100 * kill.threshold:.0f}%" if kill.threshold is not None else ""
        parts.append(f"node at {kill.node_used / GIB:.1f} of {kill.node_total / GIB:.1f} GiB{thr}")
    return "; ".join(parts)


SHARED = ("programs other than Ray and rwray held more of the node's memory than this process: if another job "
          "shares the node, run where it does not (a retry may then succeed)")


def crowded(kill: Kill) -> bool:
    """The killed process held under a third of what its node used: others, maybe another job, took the rest."""
    others = others_gib(kill)
    return others is not None and bool(kill.node_used) and others > (2 / 3) * kill.node_used / GIB


def foreign_gib(kill: Kill) -> float:
    """What the node's largest processes that are neither Ray's nor rwray's held, GiB: another program's memory."""
    return sum(gib for pid, gib, cmd in kill.top if pid != kill.pid and not cmd.startswith("ray::")
               and "rwray" not in cmd and "/ray/" not in cmd)


def others_gib(kill: Kill) -> float | None:
    """What the node used beyond the killed process, GiB."""
    if kill.node_used is None or kill.used is None:
        return None
    return max(0.0, (kill.node_used - kill.used) / GIB)


def largest_other(kill: Kill) -> str:
    rest = [(pid, gib, cmd) for pid, gib, cmd in kill.top if pid != kill.pid]
    return ", ".join(f"pid {pid} {cmd[:40] + ('...' if len(cmd) > 40 else '')} {gib:.1f} GiB"
                     for pid, gib, cmd in rest[:2]) or "see the log file"


# ---------------------------------------------------------------------------------------------------- the stage


STARTING = "before its first training step (starting: building the model, restoring a checkpoint, reading data)"


def read_status(folder: str | Path | None) -> dict[int, dict[str, Any]]:
    """rank -> the last status record each rank wrote (`rwray.train.progress.status_writer`); {} for a rank whose
    worker opened its file and has not written yet (or whose record cannot be read)."""
    out: dict[int, dict[str, Any]] = {}
    if not folder:
        return out
    for path in Path(folder).glob("rank*.json"):
        if not path.stem[4:].isdigit():
            continue
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            rec = {}
        out[int(path.stem[4:])] = rec if isinstance(rec, dict) else {}
    return out


def status_of(records: dict[int, dict[str, Any]], kind: str, pid: int | None, rank: int | None
              ) -> tuple[int | None, dict[str, Any] | None]:
    """(rank, the status record that says where the killed process was; {}: it had not written one; None: no
    record can be seen, as on another node). A train worker's is the record with its pid: one of its rank from
    another pid belongs to an earlier process of that rank, so this one was killed starting. Any other process
    (a decoding actor) is placed by its train worker's record."""
    if kind == "train worker" and pid is not None:
        for r, rec in records.items():
            if rec.get("pid") == pid:
                return r, rec
        return rank, {} if rank in records else None
    return rank, records.get(rank) if rank is not None else None


def describe_stage(rec: dict[str, Any] | None, epochs: int, steps: int | None) -> str:
    """Where a train worker was, from its status record (epochs and steps 1-based, as the terminal's epoch lines
    count them; "" when unknown). ``steps``: training steps per epoch, when known."""
    if rec is None:
        return ""
    if "epoch" not in rec:
        return STARTING
    epoch, step, stage = int(rec["epoch"]), int(rec.get("step", -1)), str(rec.get("stage") or "train")
    at = f"in epoch {epoch + 1} of {epochs}"
    if stage.startswith("evaluate"):
        split = stage.split(" ", 1)[1] if " " in stage else ""
        return f"{at}, evaluating{f' split {split}' if split else ''}"
    if stage == "final artifacts":
        return "after the last epoch, writing the final artifacts"
    if stage != "train":
        return f"{at}, {stage}"
    if step < 0:
        return f"{at}, before its first training step"
    if steps is not None and step + 1 >= steps:
        final = ", or writing the final artifacts" if epoch + 1 >= epochs else ""
        return (f"{at}, after its last training step ({step + 1} of {steps}: evaluating, checkpointing or logging"
                f"{final})")
    return f"{at}, after training step {step + 1}{f' of {steps}' if steps else ''}"


def stage_of(kind: str, rank: int | None, rec: dict[str, Any] | None, epochs: int, steps: int | None) -> str:
    if kind == "train worker":
        return describe_stage(rec, epochs, steps)
    if rec is not None:  # a helper of a train worker: where that worker was
        where = describe_stage(rec, epochs, steps)
        return f"while train worker rank {rank} was {'starting' if where == STARTING else where}"
    return ""


def steps_per_epoch(train_rows: int, world: int, batch_size: int, drop_last: bool) -> int:
    """Training steps one rank takes per epoch: its equal share of the split in batches."""
    rows = train_rows // max(world, 1)
    return rows // batch_size if drop_last else math.ceil(rows / batch_size)


# ---------------------------------------------------------------------------------------------------- the fixes


def fixes(kind: str, stage: str, kill: Kill | None, cfg: Any) -> str:
    """The config fields to change, with their current values, for what was killed where."""
    d, s, t = cfg.data, cfg.scaling, cfg.train
    out: list[str] = []
    if kill is not None and kill.used is not None and foreign_gib(kill) > kill.used / GIB:
        out.append(SHARED)
    if kind == "train worker" and not stage.startswith("after the last epoch"):
        evaluating = "evaluating" in stage or "last training step" in stage
        training = "training step" in stage and not evaluating
        if evaluating or not training:
            out.append(f"lower data.eval_batch_size (now {d.eval_batch_size}, e.g. {max(1, d.eval_batch_size // 2)})")
        if training or not evaluating:
            out.append(f"lower data.batch_size (now {d.batch_size}; data.batch_size={max(1, d.batch_size // 2)} with "
                       f"train.grad_accum={2 * t.grad_accum} keeps the effective batch) or use a smaller model")
        if "starting" in stage and d.stream != "stream":
            out.append("set data.stream=stream (each worker then holds only its share of the train split, not all "
                       "of it)")
    elif kind == "decoding actor":
        out.append(f"lower data.decode_window (now {d.decode_window}) or data.decode_actors (now {d.decode_actors} "
                   f"per worker), or raise data.decode_cpus (now {d.decode_cpus:g}: fewer decoding actors per node)")
    elif kind == "Ray Data task":
        out.append("write the shards smaller (`rwray data prepare --rows-per-shard`), or set data.stream=stream")
    per_worker = kill.used / GIB if kill is not None and kill.used else None
    if kind in ("train worker", "decoding actor") and per_worker:
        room = math.ceil(1.25 * per_worker)
        have = f" (now {s.memory_per_worker_gb:g})" if s.memory_per_worker_gb else ""
        out.append(f"run fewer workers per node: scaling.memory_per_worker_gb={room}{have} makes Ray place a worker "
                   f"only where that much memory is free")
    total = f" (this one has {kill.node_total / GIB:.0f} GiB)" if kill is not None and kill.node_total else ""
    out.append(f"{'or ' if out else ''}use nodes with more memory{total}")
    return "; ".join(out)


def retries_text(count: int, max_failures: int, repeated: bool) -> str:
    if repeated:
        return (f"Ray Train restarted the workers {count} time{'s' if count != 1 else ''} from the last checkpoint "
                f"and they ran out of memory again before reaching another one: further restarts "
                f"(train.max_failures={max_failures}) would only repeat it")
    if max_failures == 0:
        return "not retried (train.max_failures=0)"
    return f"Ray Train's restarts are used up (train.max_failures={max_failures})"


# ------------------------------------------------------------------------------------------------- the reports


def partial(rank: int | None, err: BaseException, retries: str, status_dir: str | None = None, epochs: int = 0
            ) -> OutOfMemory:
    """What Ray Train's controller knows (no config): the process, the figures, the retries, and, with the status
    folder and the epoch count, where it was. `explain` completes it on the driver."""
    kill, text = kill_of(err)
    if isinstance(err, OutOfMemory) and err.details.get("kind"):
        rank, kind = err.details.get("rank", rank), err.details["kind"]
    elif kill is None and rank is None:  # a Python MemoryError raised in this process, outside the workers
        kind = "the driver"
    else:
        kind = process_kind(kill, rank)
    rank, rec = status_of(read_status(status_dir), kind, kill.pid if kill else None, rank)
    details = {"rank": rank, "kind": kind, "kill": kill.as_dict() if kill else None, "ray_text": text[:20000],
               "status": rec}
    process = "the driver (this process)" if kind == "the driver" else describe_process(kind, rank, kill)
    return OutOfMemory(process, describe_memory(kill), stage_of(kind, rank, rec, epochs, None) if epochs else "", "",
                       retries, details=details, event=EVENT if kill is not None else "ran out of memory")


def retry_line(oom: OutOfMemory, attempt: int, max_failures: int) -> str:
    """The one terminal line for an out-of-memory kill that Ray Train retries."""
    kill = Kill.from_dict(oom.details["kill"]) if oom.details.get("kill") else None
    at = f" {oom.stage}" if oom.stage else ""
    event = "was killed by Ray's memory monitor" if kill is not None else "ran out of memory (a Python MemoryError)"
    figures = f" ({brief_memory(kill)})" if kill is not None else ""
    return (f"out of memory: {oom.process} {event}{at}{figures}; restarting the workers from the last checkpoint "
            f"(retry {attempt} of train.max_failures={max_failures})")


def explain(err: BaseException, cfg: Any, status_dir: str | None, train_rows: int | None, note: str = "",
            log_file: str | Path | None = None) -> OutOfMemory | None:
    """The driver's full report of an out-of-memory error anywhere inside ``err``, or None when there is none.
    ``log_file``: where the driver files Ray's own report (named when there is one)."""
    hit = find(err)
    if hit is None:
        return None
    rank, e = hit
    retries = e.retries if isinstance(e, OutOfMemory) else ""  # Ray's own error: not through the retry rule
    base = partial(rank, e, retries, status_dir)
    d = base.details
    kill = Kill.from_dict(d["kill"]) if d.get("kill") else None
    steps = (steps_per_epoch(train_rows, cfg.scaling.num_workers, cfg.data.batch_size, cfg.data.drop_last)
             if train_rows and cfg.train.trainable != "none" else None)
    stage = stage_of(d["kind"], d["rank"], d.get("status"), cfg.train.epochs, steps)
    if log_file is not None and d.get("ray_text"):
        note = f"{note} Ray's own report is in {log_file}.".strip()
    return OutOfMemory(base.process, base.memory, stage, fixes(d["kind"], stage, kill, cfg), retries, note, d,
                       base.event)
