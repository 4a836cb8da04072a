"""Which parameters' per-sample gradients count: selected by *module*.

A "parametrised module" is any module with trainable parameters of its own (``recurse=False``, `own_params`):
Linear, Conv2d, the affine weight/bias of BatchNorm/GroupNorm, a cosine head, ... Selecting a module selects all of
its own trainable parameters, in both Gram implementations, so a subset means the same thing everywhere. Norm
layers' affine parameters are *included* whenever their module is selected (``modules=None`` selects every
parametrised module).
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Sequence

import torch
from torch import nn

from rwray.gram.kernels import own_params

Which = Literal["all", "head", "last_k"]


def parametrised_modules(model: nn.Module) -> list[str]:
    """Qualified names of modules with trainable parameters of their own, in registration order."""
    return [name for name, m in model.named_modules() if own_params(m)]


def forward_order(model: nn.Module, *args: Any, **kwargs: Any) -> list[str]:
    """Parametrised modules in the order the forward first calls them (registration order can differ).

    Runs one forward under no_grad; modules the forward never calls are left out.
    """
    names = set(parametrised_modules(model))
    order: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if name in names:
            handles.append(m.register_forward_hook(lambda mod, a, o, name=name: order.append(name) if name not in order else None))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return order


def select_modules(order: Sequence[str], which: Which = "all", last_k: int = 1) -> list[str]:
    """Subset of forward-ordered parametrised modules: all of them, the last one (the classifier head), or the last k
    (norm layers count as modules: last_k = 2 on a ResNet is the last block's second norm layer + the head)."""
    if which == "all":
        return list(order)
    if which == "head":
        return list(order[-1:])
    if which == "last_k":
        if last_k < 1:
            raise ValueError(f"last_k must be >= 1, got {last_k}")
        return list(order[-last_k:])
    raise ValueError(f"unknown parameter subset {which!r}; choose all, head or last_k")


def module_param_names(model: nn.Module, modules: Iterable[str] | None) -> list[str]:
    """Qualified names of the trainable parameters owned by `modules` (None: every parametrised module)."""
    table = dict(model.named_modules())
    mods = parametrised_modules(model) if modules is None else list(modules)
    out: list[str] = []
    for m in mods:
        if m not in table:
            raise KeyError(f"no module named {m!r} in the model")
        out += [f"{m}.{n}" if m else n for n, _ in own_params(table[m])]
    return out
