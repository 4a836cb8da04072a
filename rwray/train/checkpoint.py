"""Checkpoint directories: one `state.pt` (tensors and plain containers only) plus the resolved config.

Loaded with ``torch.load(weights_only=True)``: restoring never unpickles arbitrary objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

STATE = "state.pt"
CONFIG = "config.yaml"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a DDP wrapper (its state_dict keys carry no 'module.' prefix)."""
    return model.module if hasattr(model, "module") else model


def save(directory: str | Path, state: dict[str, Any], config_yaml: str) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE)
    (directory / CONFIG).write_text(config_yaml)


def load(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an rwray checkpoint (no {STATE}); point resume= at a "
                                f"checkpoint_* directory under the run's output_dir/ray folder")
    return torch.load(path, map_location="cpu", weights_only=True)
