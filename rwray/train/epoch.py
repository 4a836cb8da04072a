"""One epoch of training and one evaluation pass: plain torch functions over iterables of `Batch`.

No Ray here: the loop feeds them Ray Data shards, benchmarks and tests feed them lists, and the same code runs. Losses
and counts are all-reduced (`rwray.dist`), so the numbers are exact over workers. Out of accelerator memory is
re-raised as `BatchTooLarge`, naming the config field to lower.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, NamedTuple

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from rwray import dist
from rwray.errors import BatchTooLarge, NonFiniteLoss
from rwray.methods import Method, StepInputs, weighted_loss
from rwray.metrics import (
    DATA_WAIT_FRAC,
    DATA_WAIT_S,
    TRAIN_CLIPPED,
    TRAIN_GRAD_NORM,
    TRAIN_LOSS,
    TRAIN_MEAN_WEIGHT,
    TRAIN_SAMPLES,
    TRAIN_S,
    TRAIN_SKIPPED,
    WORKER_SAMPLES_PER_S,
    Confusion,
    bias_cell_counts,
)
from rwray.train.batches import Batch

# torch.cuda.OutOfMemoryError is torch.OutOfMemoryError (every accelerator's); the name exists on CPU builds too.
OOM = torch.OutOfMemoryError


def _oom(field: str, size: int, where: str, grad_accum: int, err: BaseException) -> BatchTooLarge:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the failed step's tensors are unreachable once this frame unwinds
    first = (str(err).strip().splitlines() or [""])[0]
    return BatchTooLarge(field, size, where, grad_accum, first[:200])


def autocast(device: torch.device, amp: str):
    """bf16 (or auto: bf16 on a GPU) and fp16 autocast; fp16 needs `grad_scaler` for its gradients."""
    on = amp in ("bf16", "fp16") or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16,
                          enabled=on)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """fp16's dynamic loss scale (torch.amp.GradScaler): gradients are computed on loss × scale so that small
    ones do not underflow; a step whose scaled gradients overflowed is skipped and the scale halved."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def update(model: nn.Module, opt: torch.optim.Optimizer, clip_grad_norm: float | None,
           ema: AveragedModel | None = None, scaler: torch.amp.GradScaler | None = None
           ) -> tuple[torch.Tensor | None, bool]:
    """One optimizer step, the gradients' global L2 norm clipped to ``clip_grad_norm`` first when set (DDP has
    already averaged them, so every worker clips the same gradient the same way), then the EMA of the weights
    moved. Under fp16 the gradients are unscaled first, and a step with non-finite gradients is skipped (no
    update, no EMA move). -> (the norm before clipping, [] on the device, or None; whether the step was skipped)."""
    norm = None
    if scaler is not None:
        scaler.unscale_(opt)
    if clip_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip_grad_norm)
    skipped = False
    if scaler is None:
        opt.step()
    else:
        scale = scaler.get_scale()
        scaler.step(opt)  # skips the step when the unscaled gradients hold inf/NaN
        scaler.update()
        skipped = scaler.get_scale() < scale  # the scale only shrinks after an overflow
    opt.zero_grad(set_to_none=True)
    if ema is not None and not skipped:
        ema.update_parameters(dist.unwrap(model))
    return norm, skipped


def weight_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights and buffers (BatchNorm statistics too):
    θ_ema ← decay·θ_ema + (1 − decay)·θ after every update, starting from the weights of the first update
    (torch.optim.swa_utils semantics). Evaluate it like the model."""
    return AveragedModel(dist.unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@dataclass
class EpochTotals:
    """What an epoch has added up so far on this worker; carried in a mid-epoch checkpoint, so a resumed epoch's
    metrics cover the whole epoch."""

    loss_sum: float = 0.0  # sum of per-sample losses, this worker
    seen: int = 0  # samples, this worker
    weight_sum: float = 0.0
    steps: int = 0  # batches trained this epoch (the next step's number)
    method: dict[str, float] = field(default_factory=dict)  # method metrics, summed over steps
    norms: list = field(default_factory=list)  # per update, the gradient norm before clipping ([] tensors until saved)
    skipped: list[bool] = field(default_factory=list)  # per update: skipped for fp16 overflow
    wait_s: float = 0.0  # seconds this worker spent blocked on its next batch
    train_s: float = 0.0  # seconds in train_epoch, waiting included

    def state_dict(self) -> dict:
        return {**vars(self), "norms": [float(n) for n in self.norms]}

    @classmethod
    def from_state(cls, state: dict | None) -> "EpochTotals":
        return cls(**state) if state else cls()


def train_epoch(model: nn.Module, method: Method, opt: torch.optim.Optimizer, batches: Iterable[Batch], epoch: int,
                grad_accum: int = 1, amp: str = "none",
                on_step: Callable[[int], None] | None = None, clip_grad_norm: float | None = None,
                ema: AveragedModel | None = None, scaler: torch.amp.GradScaler | None = None,
                totals: EpochTotals | None = None) -> dict[str, float]:
    """One pass over this worker's batches. Returns epoch metrics (losses exact over workers; with clipping, the
    mean gradient norm before clipping and the fraction of updates clipped; under fp16, the fraction of updates
    skipped for overflow).

    ``totals`` continues an epoch resumed mid-way (its step count numbers the steps) and is updated in place, so
    ``on_step(step)``, which runs after each step (progress, mid-epoch checkpoints), sees it current. Out of
    accelerator memory raises `BatchTooLarge` naming data.batch_size."""
    trains = method.trains_model(epoch)  # False: only the method's own networks learn; the model runs as in eval
    model.train(trains)
    t = totals if totals is not None else EpochTotals()
    started = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    first = step = t.steps
    for step, b in enumerate(_timed(batches, t), start=first):
        last_micro = (step + 1) % grad_accum == 0
        # DDP all-reduces gradients on every backward; skip it on accumulation steps that do not update.
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        try:
            with sync:
                with autocast(b.x.device, amp), torch.set_grad_enabled(trains):
                    logits, feats = model(b.x, return_features=True)
                out = method.step(StepInputs(model, b.x, b.y, b.index, logits, feats, epoch, step, b.extras, b.mix,
                                                 lr=opt.param_groups[-1]["lr"]))
                bad = ~torch.isfinite(out.losses.detach()) | ~torch.isfinite(out.weights)
                if bad.any():
                    raise NonFiniteLoss(epoch, step, b.index[bad].tolist())
                if trains:
                    loss = weighted_loss(out) / grad_accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
            if last_micro and trains:
                _record(t, update(model, opt, clip_grad_norm, ema, scaler))
        except OOM as e:
            raise _oom("data.batch_size", len(b.y), f"at epoch {epoch}, step {step}", grad_accum, e) from None
        # One host sync a step (the loss sum); the NaN check above already waited for this step's losses.
        t.loss_sum += float(out.losses.detach().double().sum())
        t.seen += len(b.y)
        t.weight_sum += float(out.weights.sum())
        for k, v in out.metrics.items():
            t.method[k] = t.method.get(k, 0.0) + float(v)
        t.steps = step + 1
        if on_step is not None:
            on_step(step)
    if trains and t.steps % grad_accum != 0 and t.steps > first:  # a trailing partial accumulation still updates
        _record(t, update(model, opt, clip_grad_norm, ema, scaler))
    t.train_s += time.perf_counter() - started
    device = next(model.parameters()).device
    totals_ = dist.all_reduce_sum(torch.tensor([t.loss_sum, float(t.seen)], dtype=torch.float64, device=device))
    steps = max(t.steps, 1)
    return {TRAIN_LOSS: float(totals_[0] / totals_[1].clamp(min=1)), TRAIN_SAMPLES: float(totals_[1]),
            TRAIN_MEAN_WEIGHT: t.weight_sum / max(t.seen, 1), **update_metrics(t, clip_grad_norm, scaler),
            **time_metrics(t, device), **{k: v / steps for k, v in t.method.items()}}


def _timed(batches: Iterable[Batch], t: EpochTotals) -> Iterator[Batch]:
    """The batches, with the time spent waiting for each added to t.wait_s (the input pipeline's share)."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        b = next(it, None)
        t.wait_s += time.perf_counter() - t0
        if b is None:
            return
        yield b


def time_metrics(t: EpochTotals, device: torch.device) -> dict[str, float]:
    """Every worker's (wait, train seconds, samples) gathered (a [world, 3] sum, each rank filling its row):
    the means over workers, the waiting share, and each worker's samples/s."""
    per = torch.zeros(dist.world_size(), 3, dtype=torch.float64, device=device)
    per[dist.rank()] = torch.tensor([t.wait_s, t.train_s, float(t.seen)], dtype=torch.float64)
    per = dist.all_reduce_sum(per).cpu()
    wait, train, seen = per.T  # [world] each
    out = {DATA_WAIT_S: float(wait.mean()), TRAIN_S: float(train.mean()),
           DATA_WAIT_FRAC: float(wait.sum() / train.sum().clamp(min=1e-9))}
    out.update({f"{WORKER_SAMPLES_PER_S}{r}": float(seen[r] / max(float(train[r]), 1e-9)) for r in range(len(per))})
    return out


def _record(t: EpochTotals, result: tuple[torch.Tensor | None, bool]) -> None:
    norm, skipped = result
    if norm is not None:
        t.norms.append(norm)  # stays on the device: read once, at the end of the epoch
    t.skipped.append(skipped)


def update_metrics(t: EpochTotals, clip_grad_norm: float | None, scaler: torch.amp.GradScaler | None
                   ) -> dict[str, float]:
    """Over the epoch's updates, the same on every worker (the gradients are): with clipping, the mean norm before
    clipping and the fraction clipped; under fp16, the fraction skipped."""
    out = {}
    if t.norms and clip_grad_norm is not None:
        n = torch.tensor([float(v) for v in t.norms])
        out.update({TRAIN_GRAD_NORM: float(n.mean()), TRAIN_CLIPPED: float((n > clip_grad_norm).float().mean())})
    if scaler is not None and t.skipped:
        out[TRAIN_SKIPPED] = sum(t.skipped) / len(t.skipped)
    return out


class EvalCounts(NamedTuple):
    """What an evaluation pass counts, merged over workers."""

    confusion: Confusion  # (true, predicted) pair counts, sparse: O(N + K), never K x K
    cells: torch.Tensor | None  # [2, K, K_bias] (correct, total) per (class, bias) cell; data with a bias column
    clusters: torch.Tensor | None  # [R, 2, K, C] the same per (class, cluster) for R clusterings (cluster1..R)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], num_classes: int, amp: str = "none",
             num_bias: int | None = None, cluster_columns: tuple[str, ...] = (), num_clusters: int = 0
             ) -> EvalCounts:
    """Global counts over the batches all workers saw (merged, exact): the (true, predicted) pairs and, when the data
    has them, (class, bias) cells and (class, texture cluster) cells per clustering (samples with cluster -1, i.e.
    unknown, are left out of the latter)."""
    model.eval()
    device = next(model.parameters()).device
    ids: list[torch.Tensor] = []  # per batch [B] int64 true * K + predicted, on the device (no host sync a batch)
    cells = torch.zeros(2, num_classes, num_bias, dtype=torch.int64, device=device) if num_bias else None
    clusters = (torch.zeros(len(cluster_columns), 2, num_classes, num_clusters, dtype=torch.int64, device=device)
                if cluster_columns and num_clusters else None)
    for b in batches:
        if len(b.y) == 0:
            continue
        try:
            with autocast(device, amp):
                logits = model(b.x)
        except OOM as e:
            raise _oom("data.eval_batch_size", len(b.y), "while evaluating", 1, e) from None
        preds = logits.float().argmax(1)
        ids.append(b.y.long() * num_classes + preds)
        if cells is not None:
            cells += bias_cell_counts(preds, b.y, b.extras["bias"], num_classes, num_bias)
        if clusters is not None:
            for r, col in enumerate(cluster_columns):
                known = b.extras[col] >= 0  # [B]
                clusters[r] += bias_cell_counts(preds[known], b.y[known], b.extras[col][known], num_classes,
                                                num_clusters)
    mine = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64, device=device)  # [n] this worker's samples
    local = Confusion.from_ids(mine, torch.ones_like(mine), num_classes)  # [M_rank] distinct pairs
    # Each worker's distinct pairs (at most its n samples) gathered and added up: O(N), where an all-reduced dense
    # matrix would move K² counts (530 MB at K = 8,142) per split and evaluation.
    merged = Confusion.from_ids(dist.all_gather_cat(local.pairs), dist.all_gather_cat(local.counts), num_classes)
    return EvalCounts(merged, dist.all_reduce_sum(cells) if cells is not None else None,
                      dist.all_reduce_sum(clusters) if clusters is not None else None)
