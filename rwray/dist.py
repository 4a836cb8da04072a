"""The only place rwray talks to torch.distributed.

A leaf: imports nothing from rwray. Every function is exact on one process (no process group): it returns its input. So each method is a plain tensor
function in unit tests and the same code computes global-batch statistics when Ray Train has started a group.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all workers (a new tensor; the input is untouched, autograd is not tracked)."""
    if not is_distributed():
        return t.detach().clone()
    out = t.detach().clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


def all_reduce_sum_grad(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all workers, differentiable: the backward all-reduces the gradient too (each worker's
    input feeds every worker's output), e.g. for BatchNorm statistics over the global batch."""
    if not is_distributed():
        return t
    import torch.distributed.nn.functional as dfn

    return dfn.all_reduce(t, op=tdist.ReduceOp.SUM)


def global_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of all elements of ``t`` over the global batch: sum and count are reduced together, so workers may hold
    different batch sizes (the last batch of an epoch) and the result equals one worker holding everything."""
    packed = torch.stack([t.detach().sum().to(torch.float64), torch.tensor(float(t.numel()), dtype=torch.float64, device=t.device)])
    total, count = all_reduce_sum(packed).unbind()
    return (total / count).to(t.dtype)


def global_logsumexp(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(log Σ_global exp(t), global element count), stable for any magnitude: the max is reduced first."""
    t = t.detach()
    m = t.max() if t.numel() else torch.tensor(float("-inf"), device=t.device, dtype=t.dtype)
    if is_distributed():
        m = m.clone()
        tdist.all_reduce(m, op=tdist.ReduceOp.MAX)
    local = torch.exp(t - m).sum() if t.numel() else torch.zeros((), device=t.device, dtype=t.dtype)
    packed = torch.stack([local.to(torch.float64), torch.tensor(float(t.numel()), dtype=torch.float64, device=t.device)])
    total, count = all_reduce_sum(packed).unbind()
    return (m.to(torch.float64) + torch.log(total)).to(t.dtype), int(count.item())


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (first dim may differ per worker) from all workers along dim 0, in rank order."""
    if not is_distributed():
        return t.detach().clone()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    tdist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t.detach()
    parts = [torch.zeros_like(padded) for _ in sizes]
    tdist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Make ``module``'s parameters and buffers rank ``src``'s, in place, on every worker. For state each worker
    updates on its own from local data, such as BatchNorm statistics outside DDP (which only syncs its own
    module's buffers, at its forward)."""
    if not is_distributed():
        return
    for t in [*module.parameters(), *module.buffers()]:
        tdist.broadcast(t.data, src=src)


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a torch.compile and / or DDP wrapper (its state_dict keys carry no '_orig_mod.' or
    'module.' prefix); itself otherwise."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            return model
