"""The reference Gram: ``torch.func.vmap(grad(l_i))`` over ``functional_call`` of the whole model, one sample at a time.

It materialises every per-sample gradient (B x d) and multiplies. Simple, slow, memory hungry: the yardstick the
tests compare the fast path (`rwray.gram.capture`) against. It needs a deterministic forward (dropout active raises
via vmap's ``randomness="error"``). It cannot express the batch-coupled per-sample gradient of BatchNorm in training
mode (one sample per call has no batch, see `rwray.gram`), so it refuses such a model rather than silently
computing something else (per-sample statistics); compare on GroupNorm or on BatchNorm in eval mode.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from rwray.gram.kernels import batch_stats
from rwray.gram.select import module_param_names

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits [B, K], targets [B]) -> [B]


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                     modules: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """{parameter name: [B, *shape]} per-sample gradients by vmap(grad) over functional_call, one sample per call."""
    for name, m in model.named_modules():
        if batch_stats(m):
            raise ValueError(
                f"reference Gram: {name!r} is a BatchNorm using batch statistics (training mode); a one-sample "
                "functional call cannot reproduce the batch-coupled gradient. Use model.eval() for BatchNorm or GroupNorm.")
    wanted = module_param_names(model, modules)
    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in wanted}
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    fixed.update(dict(model.named_buffers()))

    def loss_i(ps: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, {**fixed, **ps}, (xi.unsqueeze(0),))
        logits = out[0] if isinstance(out, tuple) else out  # models may return (logits, features)
        return loss_fn(logits, yi.unsqueeze(0)).sum()

    return torch.func.vmap(torch.func.grad(loss_i), in_dims=(None, 0, 0), randomness="error")(params, x, y)


def reference_gram(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                   modules: Iterable[str] | None = None) -> torch.Tensor:
    """[B, B] float64 Gram from the materialised per-sample gradients (B x d held at once)."""
    grads = per_sample_grads(model, x, y, loss_fn, modules)
    G = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    for g in grads.values():
        flat = g.reshape(g.shape[0], -1)  # [B, numel]
        G += (flat @ flat.T).to(torch.float64)
    return G
