"""The training loop every Ray Train worker runs, top to bottom. It knows no method by name.

Ray appears in five visible places: get_context, get_dataset_shard, prepare_model, get_checkpoint, report.
The epoch and evaluation bodies (`train_epoch`, `evaluate`) are plain torch functions over iterables of batches,
so benchmarks run the same code in a plain process.

Restarts (a lost worker, a preempted driver) replay exactly: the data order of an epoch is a function of
(seed, epoch) alone (`epoch_order`), augmentation and dropout of (seed, rank, epoch), and the checkpoint holds the
model, optimizer, scheduler, method state and every logged epoch's metrics. An epoch's metrics are logged once,
after its checkpoint is reported; a restart skips what the restored checkpoint covers.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from rwray import dist
from rwray.config import Config
from rwray.data.augment import augment, decode, normalize
from rwray.errors import BatchTooLarge, NonFiniteLoss
from rwray.methods import METHODS, Method, StepInputs, weighted_loss
from rwray.datainfo import DataInfo
from rwray.bias_metrics import bias_cell_counts, summarize_bias_cells
from rwray.metrics import confusion_matrix, per_class_accuracy, summarize
from rwray.models import MODELS
from rwray.optim import build_optimizer, build_scheduler
from rwray.train import checkpoint

CORE_COLUMNS = ("image", "label", "index")


# torch.cuda.OutOfMemoryError is torch.OutOfMemoryError (every accelerator's); the name exists on CPU builds too.
OOM = torch.OutOfMemoryError


def _oom(field: str, size: int, where: str, grad_accum: int, err: BaseException) -> BatchTooLarge:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the failed step's tensors are unreachable once this frame unwinds
    first = (str(err).strip().splitlines() or [""])[0]
    return BatchTooLarge(field, size, where, grad_accum, first[:200])


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


def _epoch_seed(seed: int, rank: int, epoch: int) -> int:
    # Augmentation and dropout randomness are a function of (seed, rank, epoch): a resumed epoch replays exactly.
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**63)


def _order_seed(seed: int, epoch: int) -> int:
    # The data order is shared by every rank (they take interleaved slices of one permutation): no rank term.
    return (seed * 2_000_003 + epoch * 7_919 + 104_729) % (2**63)


def canonical_rows(parts: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A whole split in any chunking and any order (Ray Data hands out blocks as they come) -> one tensor per
    column, rows sorted by the stable ``index`` id ({} for an empty split)."""
    parts = [p for p in parts if len(p["index"])]
    if not parts:
        return {}
    rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    canonical = torch.argsort(rows["index"])  # [N] ids are unique per split
    return {k: v[canonical] for k, v in rows.items()}


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
    """This worker's positions in the canonical rows for one epoch, in training order: [n // world] int64.

    A permutation seeded with (seed, epoch), cut to a multiple of ``world`` and dealt round-robin: rank r takes
    positions r, r+world, ... So global step s trains on permutation positions [s*B*world, (s+1)*B*world) whatever
    the worker count, each rank takes the same number of steps (DDP needs that), and a restarted epoch sees exactly
    the rows, order and split it saw before.
    """
    g = torch.Generator().manual_seed(_order_seed(seed, epoch))
    perm = torch.randperm(n, generator=g)  # [n]
    return perm[rank:(n // world) * world:world]


class TrainRows:
    """The train split as one worker uses it: streamed from Ray Data once, kept in the worker's memory sorted by
    ``index``, and cut each epoch into this rank's batches of the (seed, epoch) permutation (`epoch_order`).

    Every worker holds the whole split: Ray's dynamic split would hand rows to whichever worker asks first, so
    neither the order nor the split would survive a restart. Streaming it once instead of every epoch saves the
    per-epoch Arrow-to-tensor conversion and copy; later epochs cost what an in-memory loader costs.
    """

    def __init__(self, stream: Callable[[], Iterable[dict[str, torch.Tensor]]]):
        self._stream = stream
        self._rows: dict[str, torch.Tensor] | None = None

    def batches(self, seed: int, epoch: int, rank: int, world: int, batch_size: int
                ) -> Iterator[dict[str, torch.Tensor]]:
        if self._rows is None:
            self._rows = canonical_rows(self._stream())
        if not self._rows:
            return
        mine = epoch_order(len(self._rows["index"]), seed, epoch, rank, world)
        for i in range(0, len(mine), batch_size):
            j = mine[i:i + batch_size]
            yield {k: v[j] for k, v in self._rows.items()}


def _status_writer(folder: str | None, rank: int, start_epoch: int) -> Callable[[int, int], None]:
    """Progress as <folder>/rank<r>.json {pid, rank, start_epoch, epoch, step}: lets an operator (or a
    fault-injection test) find which process runs which rank, where it resumed and where it is. Off unless the
    driver had RWRAY_WORKER_STATUS_DIR set."""
    if not folder:
        return lambda epoch, step: None
    path = Path(folder) / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(epoch: int, step: int) -> None:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "rank": rank, "start_epoch": start_epoch, "epoch": epoch,
                                   "step": step}))
        os.replace(tmp, path)

    return write


def train_loop_per_worker(job: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from rwray.data import Manifest
    from rwray.tracking import BufferedRunLogger
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
    history: dict[int, dict[str, Any]] = {}  # epoch -> {"ts": ms, "metrics": {...}}: what this run logged
    # Ray's own checkpoint (a restarted worker group, or a restarted driver reusing the run's Ray folder) wins;
    # otherwise the user's resume= (Train V2 leaves that to us), which starts a new MLflow run.
    same_run = ray.train.get_checkpoint()
    restored = same_run or (ray.train.Checkpoint.from_directory(str(cfg.resume)) if cfg.resume else None)
    if restored is not None:
        with restored.as_directory() as d:
            state = checkpoint.load(d)
        dist.unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        if same_run is not None:
            history = {int(e): h for e, h in state.get("history", {}).items()}

    log = BufferedRunLogger(job["tracking_uri"], job["run_id"], job["spool_dir"]) if rank == 0 else None
    if log is not None:
        # A worker that died between reporting a checkpoint and sending its metrics left a gap: fill it from the
        # checkpoint (same timestamps, so a copy that did arrive is not duplicated). Logged epochs are skipped.
        for e in sorted(history):
            log.log_epoch(e, history[e]["metrics"], history[e]["ts"])
    status = _status_writer(job.get("status_dir"), rank, start_epoch)
    num_bias = info.num_classes if "bias" in info.extra_columns else None  # bias values index the classes' colours
    classes = manifest.classes
    gen = torch.Generator(device=device)
    train_rows = TrainRows(lambda: ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=4096,
                                                                                             prefetch_batches=2))

    def train_batches(epoch: int) -> Iterator[Batch]:
        gen.manual_seed(_epoch_seed(cfg.train.seed, rank, epoch))
        for rows in train_rows.batches(cfg.train.seed, epoch, rank, world, cfg.data.batch_size):
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
        status(epoch, -1)
        metrics = train_epoch(model, method, opt, train_batches(epoch), epoch, cfg.train.grad_accum, cfg.train.amp,
                              on_step=lambda step, e=epoch: status(e, step))
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

        history[epoch] = {"ts": int(time.time() * 1000), "metrics": dict(metrics)}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                state = {"model": dist.unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "method": method.state_dict(), "epoch": epoch, "best": best,
                         "history": history}
                checkpoint.save(tmp, state, cfg.to_yaml())
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
            if rank == 0:
                # Only now: a restart resumes after this epoch, so it will not run (and log) it again.
                log.log_epoch(epoch, metrics, history[epoch]["ts"])
                if improved:
                    log.artifact(Path(tmp) / checkpoint.STATE, "checkpoints/best")
                print(progress_line(epoch, cfg.train.epochs, metrics, cfg.train.select_metric), flush=True)

    if rank == 0:
        _log_final_artifacts(log, model, method, manifest, best, classes, info)
        log.close(cfg.tracking.flush_timeout_s)


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
        torch.save(dist.unwrap(model).state_dict(), tmp / "model.pt")
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
