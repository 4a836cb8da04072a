"""The training loop every Ray Train worker runs, top to bottom. It knows no method by name.

Ray appears in five visible places: get_context, get_dataset_shard, prepare_model, get_checkpoint, report.
The epoch and evaluation bodies (`train_epoch`, `evaluate`) are plain torch functions over iterables of batches,
so benchmarks run the same code in a plain process.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from rwray import dist
from rwray.config import Config
from rwray.data.augment import augment, decode, normalize
from rwray.methods import METHODS, Method, StepInputs, weighted_loss
from rwray.methods.base import DataInfo
from rwray.bias_metrics import bias_cell_counts, summarize_bias_cells
from rwray.metrics import confusion_matrix, per_class_accuracy, summarize
from rwray.models import MODELS
from rwray.optim import build_optimizer, build_scheduler
from rwray.train import checkpoint

CORE_COLUMNS = ("image", "label", "index")


class NonFiniteLoss(FloatingPointError):
    def __init__(self, epoch: int, step: int, indices: list[int]):
        self.epoch, self.step, self.indices = epoch, step, indices
        super().__init__(
            f"non-finite loss at epoch {epoch}, step {step}, for sample index {indices[:20]}"
            f"{' ...' if len(indices) > 20 else ''}. Inspect those samples (shard column 'index'), lower optim.lr, "
            f"or check the method's parameters (e.g. ABSGD lambda). Training stopped; the last checkpoint is intact.")

    def __reduce__(self):  # crosses process boundaries (Ray worker -> driver) with its fields intact
        return type(self), (self.epoch, self.step, self.indices)


@dataclass
class Batch:
    x: torch.Tensor  # [B, C, H, W] float, augmented and normalised
    y: torch.Tensor  # [B] int64
    index: torch.Tensor  # [B] int64
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class Images:
    """Turns shard rows (a dict of tensors from Ray Data or any loader) into a `Batch` on the device."""

    def __init__(self, info: DataInfo, mean: list[float], std: list[float], device: torch.device):
        self.shape = info.image_shape
        self.device = device
        self.mean = torch.tensor(mean, device=device)
        self.std = torch.tensor(std, device=device)

    def __call__(self, rows: dict[str, torch.Tensor], aug: str = "none", padding: int = 0,
                 generator: torch.Generator | None = None) -> Batch:
        x = decode(rows["image"].to(self.device, non_blocking=True), self.shape)
        x = normalize(augment(x, aug, padding, generator), self.mean, self.std)
        extras = {k: v.to(self.device) for k, v in rows.items() if k not in CORE_COLUMNS}
        return Batch(x, rows["label"].to(self.device).long(), rows["index"].to(self.device).long(), extras)


def autocast(device: torch.device, amp: str):
    on = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on)


def train_epoch(model: nn.Module, method: Method, opt: torch.optim.Optimizer, batches: Iterable[Batch], epoch: int,
                grad_accum: int = 1, amp: str = "none") -> dict[str, float]:
    """One pass over this worker's batches. Returns epoch metrics (losses exact over workers)."""
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
        loss_sum += out.losses.detach().double().sum()
        seen += len(b.y)
        weight_sum += float(out.weights.sum())
        for k, v in out.metrics.items():
            method_metrics[k] = method_metrics.get(k, 0.0) + float(v)
    if (step + 1) % grad_accum != 0:  # a trailing partial accumulation still updates
        opt.step()
        opt.zero_grad(set_to_none=True)
    totals = dist.all_reduce_sum(torch.stack([loss_sum, torch.tensor(seen, dtype=torch.float64, device=device)]))
    steps = max(step + 1, 1)
    return {"train/loss": float(totals[0] / totals[1].clamp(min=1)), "train/samples": float(totals[1]),
            "train/mean_weight": weight_sum / max(seen, 1), **{k: v / steps for k, v in method_metrics.items()}}


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
        with autocast(device, amp):
            logits = model(b.x)
        preds = logits.float().argmax(1)
        cm += confusion_matrix(preds, b.y, num_classes)
        if cells is not None:
            cells += bias_cell_counts(preds, b.y, b.extras["bias"], num_classes, num_bias)
    return dist.all_reduce_sum(cm), (dist.all_reduce_sum(cells) if cells is not None else None)


def _epoch_seed(seed: int, rank: int, epoch: int) -> int:
    # Augmentation and dropout randomness are a function of (seed, rank, epoch): a resumed epoch replays exactly.
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**63)


def train_loop_per_worker(job: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from rwray.data import Manifest
    from rwray.tracking import RunLogger
    from rwray.train.launch import quiet_data

    quiet_data()
    cfg = Config.model_validate(job["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    manifest = Manifest.load(cfg.data.dir)
    info = manifest.data_info()
    images = Images(info, manifest.mean, manifest.std, device)

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = ray.train.torch.prepare_model(MODELS.build(cfg.model, info))
    method: Method = METHODS.build(cfg.method, info)
    method.attach(model, ray.train.torch.prepare_model, device)
    opt = build_optimizer(cfg.optim, model.parameters())
    sched = build_scheduler(cfg.schedule, opt, cfg.train.epochs)

    start_epoch, best = 0, {"score": float("-inf"), "epoch": -1, "cms": {}}
    # Ray's own checkpoint (a restarted worker group) wins; otherwise the user's resume= (Train V2 leaves that to us).
    restored = ray.train.get_checkpoint() or (ray.train.Checkpoint.from_directory(str(cfg.resume)) if cfg.resume else None)
    if restored is not None:
        with restored.as_directory() as d:
            state = checkpoint.load(d)
        checkpoint.unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        start_epoch, best = state["epoch"] + 1, state["best"]

    log = RunLogger(job["tracking_uri"], job["run_id"]) if rank == 0 else None
    num_bias = info.num_classes if "bias" in info.extra_columns else None  # bias values index the classes' colours
    classes = manifest.classes
    gen = torch.Generator(device=device)

    def train_batches(epoch: int) -> Iterator[Batch]:
        gen.manual_seed(_epoch_seed(cfg.train.seed, rank, epoch))
        shard = ray.train.get_dataset_shard("train")
        for rows in shard.iter_torch_batches(batch_size=cfg.data.batch_size, prefetch_batches=2):
            yield images(rows, cfg.data.augment, cfg.data.crop_padding, gen)

    def eval_batches(split: str) -> Iterator[Batch]:
        # Eval splits are not split by Ray (its equal split drops rows): every worker reads the split and keeps
        # the rows with index % world == rank, so each sample is scored exactly once.
        for rows in ray.train.get_dataset_shard(split).iter_torch_batches(batch_size=cfg.data.eval_batch_size):
            mine = rows["index"] % world == rank
            yield images({k: v[mine] for k, v in rows.items()})

    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(_epoch_seed(cfg.train.seed, rank, epoch))
        method.begin_epoch(epoch)
        metrics = train_epoch(model, method, opt, train_batches(epoch), epoch, cfg.train.grad_accum, cfg.train.amp)
        metrics["train/lr"] = opt.param_groups[0]["lr"]
        sched.step()
        metrics.update(method.end_epoch(epoch))
        cms = {}
        for split in manifest.eval_splits:
            cm, cells = evaluate(model, eval_batches(split), info.num_classes, cfg.train.amp, num_bias)
            cms[split] = cm = cm.cpu()
            metrics.update({f"{split}/{k}": v for k, v in summarize(cm, info.class_counts).items()})
            acc = per_class_accuracy(cm)  # [K]; NaN where the split has no sample of the class
            metrics.update({f"{split}/class_acc/{c}": float(a) for c, a in enumerate(acc) if not torch.isnan(a)})
            if cells is not None:
                metrics.update({f"{split}/bias/{k}": v for k, v in summarize_bias_cells(cells.cpu()).items()})
        metrics["time/epoch_s"] = time.perf_counter() - t0
        metrics["train/samples_per_s"] = metrics["train/samples"] / metrics["time/epoch_s"]

        score = metrics.get(cfg.train.select_metric, float("-inf"))
        improved = score > best["score"]
        if improved:  # chosen on validation only; every other split's numbers of that epoch are reported alongside
            best = {"score": score, "epoch": epoch, "cms": cms}
        metrics.update({"best/epoch": best["epoch"], f"best/{cfg.train.select_metric}": best["score"]})
        for split, cm in best["cms"].items():
            if split != "val":
                metrics.update({f"best/{split}/{k}": v for k, v in summarize(cm, info.class_counts).items()})

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                state = {"model": checkpoint.unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "method": method.state_dict(), "epoch": epoch, "best": best}
                checkpoint.save(tmp, state, cfg.to_yaml())
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                log.metrics(metrics, step=epoch)
                if improved:
                    log.artifact(Path(tmp) / checkpoint.STATE, "checkpoints/best")
                print(progress_line(epoch, cfg.train.epochs, metrics, cfg.train.select_metric), flush=True)
            ray.train.report(metrics, checkpoint=ckpt)

    if rank == 0:
        _log_final_artifacts(log, model, method, manifest, best, classes, info)


def progress_line(epoch: int, epochs: int, m: dict[str, float], select: str) -> str:
    return (f"epoch {epoch + 1:>3}/{epochs}  loss {m['train/loss']:.4f}  lr {m['train/lr']:.4g}  "
            f"val bal-acc {100 * m['val/balanced_acc']:5.1f}  test bal-acc {100 * m['test/balanced_acc']:5.1f}  "
            f"best {select}={100 * m[f'best/{select}']:.1f} @ {int(m['best/epoch']) + 1}  "
            f"{m['train/samples_per_s']:.0f} samples/s")


def _log_final_artifacts(log, model, method, manifest, best, classes, info) -> None:
    import json

    from rwray import plots

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(checkpoint.unwrap(model).state_dict(), tmp / "model.pt")
        log.artifact(tmp / "model.pt", "checkpoints/last")
        cm = best["cms"]["test"]
        acc = per_class_accuracy(cm).nan_to_num(0).tolist()
        (tmp / "confusion_matrix.json").write_text(json.dumps({"classes": classes, "rows_true_cols_pred": cm.tolist(),
                                                                 "epoch": best["epoch"], "split": "test"}))
        plots.per_class_accuracy(acc, info.class_counts, classes,
                                 f"test accuracy per class (epoch {best['epoch'] + 1}, chosen on val)",
                                 tmp / "per_class_accuracy.png")
        plots.confusion_matrix(cm.numpy(), classes, "test confusion matrix (row-normalised)", tmp / "confusion_matrix.png")
        for name in ("confusion_matrix.json", "per_class_accuracy.png", "confusion_matrix.png"):
            log.artifact(tmp / name, "evaluation")
        for path in method.artifacts(str(tmp)):
            log.artifact(path, "method")
