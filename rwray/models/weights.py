"""``model.weights: PATH``: start a freshly built model from a local state dict (ImageNet weights, a seed's file).

Nothing is ever downloaded: the file is read with ``torch.load(map_location="cpu", weights_only=True)``, so it may
hold tensors and plain containers only. Accepted layouts: a plain state dict, or a dict holding one under
"state_dict" (Lightning, many seeds) or "model" (rwray's own checkpoints). Key prefixes that wrappers add are
dropped: ``module.`` (DataParallel / DDP) and ``_orig_mod.`` (torch.compile).

The classifier ``fc`` is special: a file whose head has another shape (1000 ImageNet classes into a 9-class
model, or a cosine head into a linear one) leaves the model's fresh head in place, with a one-line note. Any other
difference (a missing or extra key, another shape) refuses the file, naming the keys: half-loaded weights would
train silently from a wrong start.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator
from torch import nn

from rwray.errors import CheckpointError
from rwray.output import say

HEAD = "fc."  # every registry model names its classifier fc (rwray.train.decoupled relies on it too)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHOWN = 5  # mismatched keys named in an error


def _absolute(p: Path) -> Path:
    # Resolved where the config is read (the driver): a Ray worker runs in another working directory, where a
    # relative path would name nothing. Every worker node must see the file at this path.
    return p.expanduser().resolve()


WeightsPath = Annotated[Path, AfterValidator(_absolute)]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's state dict with wrapper prefixes removed; CheckpointError for anything unreadable."""
    path = Path(path).expanduser()
    fix = "Fix: set model.weights to a .pt/.pth file saved with torch.save(model.state_dict(), path)"
    if not path.is_file():
        why = "it is a folder" if path.is_dir() else "no such file"
        raise CheckpointError(str(path), f"model.weights: {why}. {fix}")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a pickled class or function, or a plain pickle
        why = next((ln.split("error:", 1)[1].strip() for ln in str(e).splitlines()
                    if "WeightsUnpickler error:" in ln), "")
        raise CheckpointError(str(path), f"model.weights is not a readable torch file of tensors and plain "
                                         f"containers{f' ({why[:200]})' if why else ''}. {fix}") from None
    except Exception as e:  # truncated, empty, not a torch file at all (a text file raises KeyError)
        raise CheckpointError(str(path), f"model.weights is not a readable torch file "
                                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). "
                                         f"{fix}") from None
    state = obj
    if isinstance(obj, dict) and not _all_tensors(obj):
        state = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
    if not isinstance(state, dict) or not state or not _all_tensors(state):
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(str(path), f"model.weights holds {what}, not a state dict of tensors (plain, or under "
                                         f"'state_dict' or 'model'). {fix}")
    return {_strip(k): v for k, v in state.items()}


def _all_tensors(d: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _strip(key: str) -> str:
    # Repeatedly: a compiled model wrapped in DDP saves "module._orig_mod.conv1.weight".
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy the file's weights into ``model`` (in place; returned for chaining). A head of another shape is left
    fresh (with a note); every other mismatch raises CheckpointError naming the file and keys."""
    state = read_state_dict(path)
    own = model.state_dict()
    own_head = {k: tuple(v.shape) for k, v in own.items() if k.startswith(HEAD)}
    file_head = {k: tuple(v.shape) for k, v in state.items() if k.startswith(HEAD)}
    if own_head and file_head != own_head:
        state = {k: v for k, v in state.items() if not k.startswith(HEAD)}
        have = ", ".join(f"{k} {list(s)}" for k, s in file_head.items()) or "no fc.* entries"
        want = ", ".join(f"{k} {list(s)}" for k, s in own_head.items())
        say(f"model.weights: {path} has head {have}; the model's is {want}: keeping the model's fresh head")
    # BatchNorm counters are optional: files older than torch 0.4.1 lack them and BatchNorm fills them in itself.
    missing = [k for k in own if k not in state and not (k.endswith("num_batches_tracked") or k in own_head)]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in state
                if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        parts = [f"{len(v)} {what} ({', '.join(v[:SHOWN])}{', ...' if len(v) > SHOWN else ''})"
                 for what, v in (("missing from the file", missing), ("unknown to the model", unexpected),
                                 ("of another shape (file vs model)", reshaped)) if v]
        raise CheckpointError(str(path), f"model.weights does not fit {type(model).__name__}: {'; '.join(parts)}. "
                                         f"Fix: use weights saved from the same architecture (model.name) and input "
                                         f"channels, or leave model.weights unset")
    model.load_state_dict(state, strict=False)  # strict=False only for the head dropped and counters absent above
    return model


def maybe_load(model: nn.Module, path: Path | None) -> nn.Module:
    """The builders' hook: load ``path`` when set."""
    return model if path is None else load_weights(model, path)
