"""Fault injectors for tests and drills: faults that cannot be caused from outside a worker by a real config.

``RWRAY_FAULT_MEMORY="rank=0,epoch=1,step=2,gib=8"``: when training worker ``rank`` has finished step ``step`` of
epoch ``epoch`` (both 0-based, as the loop counts them), it allocates host memory, 256 MiB at a time and written
to, up to ``gib`` GiB, and holds it for ``hold_s`` seconds (default 60) before letting go and training on. Under a
Ray memory monitor whose threshold lies below that, the worker is killed the way a real leak or an oversized batch
gets it killed (tests/test_oom.py). Every process of a local Ray inherits the driver's environment; on a cluster
the variable must reach the workers (a job's runtime_env ``env_vars``). Unset: nothing happens, at no cost.

A leaf apart from the standard library and numpy: the training loop calls it through
`rwray.train.progress.status_writer`.
"""

from __future__ import annotations

import os
import time
from typing import Callable

MEMORY_ENV = "RWRAY_FAULT_MEMORY"
CHUNK = 256 << 20  # bytes per allocation: small enough that a 100 ms memory monitor sees the growth as it happens


def parse_spec(text: str) -> dict[str, float]:
    """"rank=0,epoch=1,step=2,gib=8" -> {"rank": 0.0, ...}. Malformed pairs are an error: a drill that silently did
    nothing would pass for a drill that worked."""
    out: dict[str, float] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"{MEMORY_ENV}: {pair!r} is not key=value")
        out[key.strip()] = float(value)
    missing = {"rank", "epoch", "step", "gib"} - set(out)
    if missing:
        raise ValueError(f"{MEMORY_ENV}={text!r}: missing {', '.join(sorted(missing))}")
    return out


def memory_fault(rank: int, environ: dict[str, str] | None = None) -> Callable[[int, int], None] | None:
    """The hook `status_writer` calls after each step, or None when the variable is unset or names another rank."""
    text = (os.environ if environ is None else environ).get(MEMORY_ENV, "")
    if not text:
        return None
    spec = parse_spec(text)
    if int(spec["rank"]) != rank:
        return None
    at = (int(spec["epoch"]), int(spec["step"]))

    def maybe_allocate(epoch: int, step: int) -> None:
        if (epoch, step) == at:
            allocate(int(spec["gib"] * (1 << 30)), spec.get("hold_s", 60.0))

    return maybe_allocate


def allocate(nbytes: int, hold_s: float) -> None:
    """Take ``nbytes`` of resident memory (every page written), then hold it ``hold_s`` seconds."""
    import numpy as np

    held = []
    while len(held) * CHUNK < nbytes:
        held.append(np.ones(CHUNK, dtype=np.uint8))  # written, so resident: not just reserved address space
        time.sleep(0.05)
    time.sleep(hold_s)
    del held
