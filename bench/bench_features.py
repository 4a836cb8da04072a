"""What do the training features cost? A class-balanced sampler epoch vs a uniform one, a step with a weight EMA
or gradient clipping vs a plain step, and a step whose input gets AutoAugment + Cutout or mixup vs the crop-and-flip
input, CPU.

Writes docs/benchmarks-features.md (regenerate by running this script; the file says how it was produced).

Steps: ResNet-32 (`rwray.models`) on CIFAR-shaped random data (B=128, labels from the CIFAR-10-LT IF100 prior), one
step = the product's `train_epoch` over one batch, with `ema=weight_ema(model, 0.999)` or `clip_grad_norm=1.0`.
Epochs: the worker's input path (`TrainRows.batches` with the sampler, the per-batch class count the loop keeps,
`Images` decoding uint8 rows) feeding `train_epoch` of a `small_cnn` (width 16) over a CIFAR-10-LT IF100-sized
split (12,406 rows) of digits-sized 1x8x8 images: the sampler's work is per epoch and per batch and does not depend
on the image, so the epoch is kept cheap on purpose; against a real epoch's compute the ratio can only be closer
to 1.

Input: ResNet-32 steps, each with its batch's input path (`Images` from B=128 CIFAR-shaped uint8 rows): pad-4 crop +
flip (the plain CIFAR recipe), + AutoAugment (per sample, torchvision) + Cutout 16 (the Balanced Meta-Softmax recipe),
or + mixup. No goal: the ratios say what the per-sample policy costs against a CPU step (against a GPU step it is a
far larger share; see docs/benchmarks-gpu.md when measured).

Variants are timed INTERLEAVED in one process, in a fresh random order each round, and the ratios are per round
(paired); an A/A control (a second copy of the baseline) shows the noise floor. Medians, IQR and a bootstrap 95 %
interval of the median ratio are reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from bench_losses import COUNTS, INFO, bootstrap_median_ci, make_batches, quantiles

from rwray.datainfo import DataInfo
from rwray.methods import METHODS
from rwray.methods.erm import ERMParams
from rwray.models import MODELS
from rwray.models.resnet_cifar import ResNet32Params
from rwray.models.small_cnn import SmallCNNParams
from rwray.optim import OptimConfig, build_optimizer
from rwray.data.policy import Policy
from rwray.train.batches import Augmentation, Images, TrainRows
from rwray.train.epoch import train_epoch, weight_ema

ROOT = Path(__file__).resolve().parent.parent
SGD = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=2e-4)
STEP_VARIANTS = {"plain": {}, "plain_aa": {}, "ema": {"ema": 0.999}, "clip": {"clip_grad_norm": 1.0}}
EPOCH_VARIANTS = ("uniform", "uniform_aa", "class_balanced")
INPUT_VARIANTS = {
    "crop_flip": Augmentation("crop_flip", 4),
    "crop_flip_aa": Augmentation("crop_flip", 4),
    "autoaugment_cutout": Augmentation("crop_flip", 4, Policy("autoaugment", "cifar10"), cutout=16),
    "mixup": Augmentation("crop_flip", 4, mix="mixup"),
}
RATIOS = [  # (numerator, denominator, goal, label)
    ("ema", "plain", 1.05, "step with a weight EMA / plain step (ResNet-32)"),
    ("clip", "plain", 1.05, "step with gradient clipping / plain step (ResNet-32)"),
    ("plain_aa", "plain", None, "A/A control: plain step copy / plain step"),
    ("class_balanced", "uniform", 1.02, "class-balanced sampler epoch / uniform epoch (small_cnn)"),
    ("uniform_aa", "uniform", None, "A/A control: uniform epoch copy / uniform epoch"),
    ("autoaugment_cutout", "crop_flip", None, "input + step, AutoAugment + Cutout / crop + flip (ResNet-32)"),
    ("mixup", "crop_flip", None, "input + step, mixup / crop + flip (ResNet-32)"),
    ("crop_flip_aa", "crop_flip", None, "A/A control: crop + flip copy / crop + flip"),
]


def step_runner(settings: dict):
    torch.manual_seed(0)
    model = MODELS.build(ResNet32Params(), INFO)
    opt = build_optimizer(SGD, model.parameters())
    ema = weight_ema(model, settings["ema"]) if "ema" in settings else None
    method = METHODS.build(ERMParams(), INFO)

    def run(batch) -> float:
        t0 = time.perf_counter()
        train_epoch(model, method, opt, [batch], 0, clip_grad_norm=settings.get("clip_grad_norm"), ema=ema)
        return time.perf_counter() - t0
    return run


def epoch_runner(sampler: str, rows: dict[str, torch.Tensor], info: DataInfo):
    torch.manual_seed(0)
    model = MODELS.build(SmallCNNParams(width=16), info)
    opt = build_optimizer(SGD, model.parameters())
    method = METHODS.build(ERMParams(), info)
    train = TrainRows(lambda: [rows])
    images = Images(info, [0.5], [0.25], torch.device("cpu"))
    kind = sampler.removesuffix("_aa")

    def batches(epoch: int):
        counts = torch.zeros(info.num_classes, dtype=torch.int64)
        for r in train.batches(0, epoch, 0, 1, 128, kind, 200, info.num_classes):  # as rwray.train.inputs.Data
            counts += torch.bincount(r["label"].long(), minlength=info.num_classes)
            yield images(r)

    def run(epoch: int) -> float:
        t0 = time.perf_counter()
        train_epoch(model, method, opt, batches(epoch), epoch)
        return time.perf_counter() - t0
    return run


def input_runner(aug: Augmentation):
    """One ResNet-32 step including its input: uint8 rows -> `Images` (train augmentation) -> `train_epoch`."""
    step = step_runner({})
    images = Images(INFO, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], torch.device("cpu"), aug=aug)
    gen = torch.Generator()

    def run(rows_and_round) -> float:
        rows, rnd = rows_and_round
        t0 = time.perf_counter()
        gen.manual_seed(rnd)
        batch = images(rows, train=True, generator=gen, seed=0, epoch=rnd)
        return (time.perf_counter() - t0) + step(batch)
    return run


def cifar_rows(n: int = 128) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randint(0, 256, (n, 3 * 32 * 32), dtype=torch.uint8, generator=g),
            "label": torch.randint(0, 10, (n,), generator=g), "index": torch.arange(n)}


def lt_rows() -> tuple[dict[str, torch.Tensor], DataInfo]:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])  # 12,406 rows, IF 100
    n = len(labels)
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (n, 8 * 8), dtype=torch.uint8, generator=g)
    return {"image": image, "label": labels, "index": torch.arange(n)}, DataInfo(10, COUNTS, (1, 8, 8), n)


def interleave(runners: dict, rounds: int, warmup: int, arg) -> dict[str, list[float]]:
    times = {k: [] for k in runners}
    rng = random.Random(0)
    for rnd in range(warmup + rounds):
        order = list(runners)
        rng.shuffle(order)
        for k in order:
            dt = runners[k](arg(rnd))
            if rnd >= warmup:
                times[k].append(dt)
        if rnd >= warmup:
            print(f"round {rnd - warmup + 1:>3}/{rounds}  " + "  ".join(f"{k} {1e3 * v[-1]:.0f}ms"
                                                                     for k, v in times.items()), flush=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed rounds of steps")
    ap.add_argument("--epochs", type=int, default=12, help="timed rounds of epochs")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-features.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0, started = os.getloadavg()[0], time.perf_counter()

    batches = make_batches(4, 128, seed=0)
    print(f"steps: ResNet-32, B=128, {len(STEP_VARIANTS)} variants x {args.steps} rounds", flush=True)
    times = interleave({k: step_runner(s) for k, s in STEP_VARIANTS.items()}, args.steps, 3,
                       lambda rnd: batches[rnd % len(batches)])
    rows = cifar_rows()
    print(f"input: ResNet-32 step + its input path, {len(INPUT_VARIANTS)} variants x {args.steps} rounds", flush=True)
    times |= interleave({k: input_runner(a) for k, a in INPUT_VARIANTS.items()}, args.steps, 3,
                        lambda rnd: (rows, rnd))
    rows, info = lt_rows()
    print(f"epochs: small_cnn over {len(rows['label'])} rows, {len(EPOCH_VARIANTS)} variants x {args.epochs} rounds",
          flush=True)
    times |= interleave({k: epoch_runner(k, rows, info) for k in EPOCH_VARIANTS}, args.epochs, 1, lambda rnd: rnd)
    write(args, times, load0, os.getloadavg()[0], time.perf_counter() - started)


def write(args, times: dict[str, list[float]], load0: float, load1: float, elapsed: float) -> None:
    lines = ["## Training features: what a sampler, a weight EMA, gradient clipping and augmentations cost", "",
             f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `.venv/bin/python bench/bench_features.py` "
             f"on {platform.machine()} with {os.cpu_count()} CPU(s), {torch.get_num_threads()} torch thread(s); "
             f"{elapsed / 60:.1f} min; load average {load0:.1f} at the start, {load1:.1f} at the end. Steps: "
             f"ResNet-32, B=128, CIFAR-shaped random data, the product's `train_epoch` over one batch ({args.steps} "
             f"rounds). Epochs: `small_cnn` (width 16) over a CIFAR-10-LT IF100-sized split of 12,406 random 1x8x8 "
             f"uint8 images through `TrainRows` + `Images` + `train_epoch`, B=128 ({args.epochs} rounds). Input: the "
             f"ResNet-32 step plus `Images` on B=128 CIFAR-shaped uint8 rows ({args.steps} rounds). Variants "
             f"interleaved in a fresh random order each round; ratios paired per round.", "",
             "| variant | median (ms) | IQR (ms) |", "|---|---:|---:|"]
    for k, v in times.items():
        q1, med, q3 = quantiles(v)
        lines.append(f"| {k} | {1e3 * med:.1f} | {1e3 * q1:.1f}–{1e3 * q3:.1f} |")
    lines += ["", "| ratio | median (per round) | IQR | 95 % CI of the median | goal | verdict |",
              "|---|---:|---:|---:|---|---|"]
    for num, den, goal, label in RATIOS:
        paired = [a / b for a, b in zip(times[num], times[den])]
        q1, med, q3 = quantiles(paired)
        lo, hi = bootstrap_median_ci(paired)
        verdict = "-" if goal is None else ("met" if med <= goal else "**missed**")
        lines.append(f"| {label} | {med:.3f} | {q1:.3f}–{q3:.3f} | {lo:.3f}–{hi:.3f} | "
                     f"{'-' if goal is None else f'<= {goal:.2f}'} | {verdict} |")
    lines.append("")
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
