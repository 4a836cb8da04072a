"""Checkpoint directories: one `state.pt` (tensors and plain containers only) plus the resolved config.

Loaded with ``torch.load(weights_only=True)``: restoring never unpickles arbitrary objects. A file that holds
anything else (a pickled class, a function reference) is refused with `CheckpointError` before any of it runs.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from rwray.errors import CheckpointError, NotACheckpoint

STATE = "state.pt"
CONFIG = "config.yaml"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's reported checkpoints


def save(directory: str | Path, state: dict[str, Any], config_yaml: str) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE)
    (directory / CONFIG).write_text(config_yaml)


def load(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STATE
    if not path.is_file():
        raise NotACheckpoint(f"{directory} is not an rwray checkpoint (no {STATE}); point resume= at a "
                                f"checkpoint_* directory under the run's output_dir/ray folder")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's long message names the offending global (e.g. "Unsupported global: GLOBAL posix.system"): keep that.
        found = re.search(r"Unsupported (global|operand)[^.\n]*", re.sub(r"\x1b\[[0-9;]*m", "", str(e)))
        what = found.group(0).strip() if found else type(e).__name__
        raise CheckpointError(str(path), f"it holds objects other than tensors and plain containers ({what[:300]}). "
                              "rwray never writes such files: it was not written by rwray or was altered. Fix: "
                              "resume from a checkpoint_* folder this project wrote, or start without resume=") from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated / not a torch file
        raise CheckpointError(str(path), f"it is not a readable torch file ({type(e).__name__}: {str(e)[:200]}). "
                              "Fix: resume from an earlier checkpoint_* folder (Ray keeps the last two)") from None


def latest_in(run_dir: str | Path) -> Path | None:
    """The newest checkpoint Ray Train recorded for a run folder (output_dir/ray/<run>), or None.

    Ray's snapshot names the latest reported checkpoint; a checkpoint folder without a snapshot entry was never
    committed (the worker died while reporting it) and is ignored, as Ray ignores it on restore.
    """
    snap = Path(run_dir) / RAY_SNAPSHOT
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):
        return None
    name = latest.get("checkpoint_dir_name")
    d = Path(run_dir) / name if name else None
    return d if d is not None and (d / STATE).is_file() else None
