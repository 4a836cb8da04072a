"""train.compile: the model under torch.compile, or a clear reason why not, before the first step.

torch.compile fails late and verbosely: the first forward pass raises from deep inside code generation (on CPU,
inductor needs a working C++ compiler; some backends need Triton). A tiny function is compiled first, on the
worker's device with the job's backend, so that such a failure is one message naming the setting to change.
"""

from __future__ import annotations

import torch
from torch import nn

from rwray.errors import CompileUnavailable


def _probe(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) * 2 + 1


def compile_model(model: nn.Module, method_name: str, supported: bool, backend: str,
                  device: torch.device) -> nn.Module:
    """-> ``torch.compile(model, backend=backend)``, after checking the method allows it and the backend runs."""
    if not supported:
        raise CompileUnavailable(f"train.compile: method {method_name!r} hooks into the model and is not checked "
                                 f"under torch.compile. Set train.compile=false for it.")
    try:
        torch._dynamo.reset()  # a fresh probe each time (dynamo caches compiled code per function)
        torch.compile(_probe, backend=backend)(torch.ones(8, device=device))
    except Exception as e:  # noqa: BLE001 - whatever code generation raises, the user's fix is the same
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CompileUnavailable(
            f"train.compile: torch.compile with backend {backend!r} cannot run on this worker ({device}): "
            f"{type(e).__name__}: {first}. Set train.compile=false, or train.compile_backend=aot_eager (no code "
            f"generation), or install what the backend needs (a C++ compiler for inductor on CPU).") from None
    return torch.compile(model, backend=backend)
