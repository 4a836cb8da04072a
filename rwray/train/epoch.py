"""One epoch of training and one evaluation pass: plain torch functions over iterables of `Batch`.

No Ray here: the loop feeds them Ray Data shards, benchmarks and tests feed them lists, and the same code runs. Losses
and counts are all-reduced (`rwray.dist`), so the numbers are exact over workers. Out of accelerator memory is
re-raised as `BatchTooLarge`, naming the config field to lower.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import nn

from rwray import dist
from rwray.errors import BatchTooLarge, NonFiniteLoss
from rwray.methods import Method, StepInputs, weighted_loss
from rwray.metrics import TRAIN_LOSS, TRAIN_MEAN_WEIGHT, TRAIN_SAMPLES, bias_cell_counts, confusion_matrix
from rwray.train.batches import Batch

# torch.cuda.OutOfMemoryError is torch.OutOfMemoryError (every accelerator's); the name exists on CPU builds too.
OOM = torch.OutOfMemoryError


def _oom(field: str, size: int, where: str, grad_accum: int, err: BaseException) -> BatchTooLarge:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the failed step's tensors are unreachable once this frame unwinds
    first = (str(err).strip().splitlines() or [""])[0]
    return BatchTooLarge(field, size, where, grad_accum, first[:200])


def autocast(device: torch.device, amp: str):
    on = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on)


def train_epoch(model: nn.Module, method: Method, opt: torch.optim.Optimizer, batches: Iterable[Batch], epoch: int,
                grad_accum: int = 1, amp: str = "none",
                on_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """One pass over this worker's batches. Returns epoch metrics (losses exact over workers).

    Out of accelerator memory raises `BatchTooLarge` naming data.batch_size; ``on_step(step)`` runs after each
    step (progress reporting)."""
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = weight_sum = 0.0
    method_metrics: dict[str, float] = {}
    opt.zero_grad(set_to_none=True)
    step = -1
    for step, b in enumerate(batches):
        last_micro = (step + 1) % grad_accum == 0
        # DDP all-reduces gradients on every backward; skip it on accumulation steps that do not update.
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        try:
            with sync:
                with autocast(device, amp):
                    logits, feats = model(b.x, return_features=True)
                out = method.step(StepInputs(model, b.x, b.y, b.index, logits, feats, epoch, step, b.extras))
                bad = ~torch.isfinite(out.losses.detach()) | ~torch.isfinite(out.weights)
                if bad.any():
                    raise NonFiniteLoss(epoch, step, b.index[bad].tolist())
                loss = weighted_loss(out)
                (loss / grad_accum).backward()
            if last_micro:
                opt.step()
                opt.zero_grad(set_to_none=True)
        except OOM as e:
            raise _oom("data.batch_size", len(b.y), f"at epoch {epoch}, step {step}", grad_accum, e) from None
        loss_sum += out.losses.detach().double().sum()
        seen += len(b.y)
        weight_sum += float(out.weights.sum())
        for k, v in out.metrics.items():
            method_metrics[k] = method_metrics.get(k, 0.0) + float(v)
        if on_step is not None:
            on_step(step)
    if (step + 1) % grad_accum != 0:  # a trailing partial accumulation still updates
        opt.step()
        opt.zero_grad(set_to_none=True)
    totals = dist.all_reduce_sum(torch.stack([loss_sum, torch.tensor(seen, dtype=torch.float64, device=device)]))
    steps = max(step + 1, 1)
    return {TRAIN_LOSS: float(totals[0] / totals[1].clamp(min=1)), TRAIN_SAMPLES: float(totals[1]),
            TRAIN_MEAN_WEIGHT: weight_sum / max(seen, 1), **{k: v / steps for k, v in method_metrics.items()}}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], num_classes: int, amp: str = "none",
             num_bias: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Global counts over the batches all workers saw (all-reduced, exact): the confusion matrix [K, K] and, when
    the data has a bias attribute, (correct, total) per (class, bias) cell [2, K, K_bias]."""
    model.eval()
    device = next(model.parameters()).device
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    cells = torch.zeros(2, num_classes, num_bias, dtype=torch.int64, device=device) if num_bias else None
    for b in batches:
        if len(b.y) == 0:
            continue
        try:
            with autocast(device, amp):
                logits = model(b.x)
        except OOM as e:
            raise _oom("data.eval_batch_size", len(b.y), "while evaluating", 1, e) from None
        preds = logits.float().argmax(1)
        cm += confusion_matrix(preds, b.y, num_classes)
        if cells is not None:
            cells += bias_cell_counts(preds, b.y, b.extras["bias"], num_classes, num_bias)
    return dist.all_reduce_sum(cm), (dist.all_reduce_sum(cells) if cells is not None else None)
