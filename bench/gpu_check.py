"""The GPU check: rwray's training step against a plain torch loop, and each method against ERM, on one GPU.

ResNet-32 (`rwray.models`) on CIFAR-shaped data (3x32x32, 10 classes, labels from the CIFAR-10-LT exp IF100 prior),
B=128, bf16 autocast, SGD momentum 0.9. The data sits on the GPU already, normalised, in both loops, so what is
compared is the step itself:

- rwray: the product's `rwray.train.epoch.train_epoch` over an epoch of batches, with a method from the registry
  (`METHODS.build`, as a Ray Train worker builds it): forward, `method.step`, the finite check, the weighted
  reduction, backward, optimizer step, the epoch's exact loss sum.
- plain: forward under autocast, `F.cross_entropy`, backward, optimizer step; nothing else.

Each round times one epoch of every variant in a fresh random order (CUDA synchronised around each); images/s come
from the median epoch, ratios are paired per round (variant / ERM in the same round), then the median. Peak memory is
`torch.cuda.max_memory_allocated` over the variant's epochs. Runs without Ray and MLflow (the GPU machine has
neither); on CPU it runs too, with a few small steps, as a smoke test.

    python bench/gpu_check.py --out docs/benchmarks-gpu.md      # writes the doc and FILE.json beside it
    (on the lent GPU machine: PYTHONPATH=<pydantic wheels unpacked>:. python3 bench/gpu_check.py --out $OUT/...)
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from rwray.datainfo import DataInfo
from rwray.losses.balanced_softmax import BalancedSoftmaxParams
from rwray.losses.ce import CEParams
from rwray.methods import METHODS
from rwray.methods.absgd import ABSGDParams
from rwray.methods.batch_reweight import BatchReweightParams
from rwray.methods.erm import ERMParams
from rwray.methods.rebias import ReBiasParams
from rwray.models import MODELS
from rwray.models.resnet_cifar import ResNet32Params
from rwray.optim import OptimConfig, build_optimizer
from rwray.train.batches import Batch
from rwray.train.epoch import train_epoch

COUNTS = (5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50)  # CIFAR-10-LT exp IF100 (methods.md)
INFO = DataInfo(num_classes=10, class_counts=COUNTS, image_shape=(3, 32, 32), num_train=sum(COUNTS))
OPTIM = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=2e-4)  # the ABSGD/LDAM recipe's optimiser
METHOD_VARIANTS = {  # key -> method params; every ratio is against "erm"
    "erm": ERMParams(loss=CEParams()),
    "absgd": ABSGDParams(lam=5.0, loss=CEParams()),  # any active lambda takes the reweighting path
    "balanced_softmax": ERMParams(loss=BalancedSoftmaxParams()),
    "batch_reweight": BatchReweightParams(),
    "rebias": ReBiasParams(),
}
GOAL_VS_PLAIN, GOAL_IMAGES_S = 0.95, 30_000


def batches(steps: int, batch: int, device: torch.device) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    n = steps * batch
    x = torch.randn(n, 3, 32, 32, generator=g).to(device)  # [N, 3, 32, 32], already normalised
    y = torch.multinomial(torch.tensor(COUNTS, dtype=torch.float64), n, replacement=True, generator=g).to(device)
    idx = torch.arange(n, device=device)
    return [Batch(x[i:i + batch], y[i:i + batch], idx[i:i + batch]) for i in range(0, n, batch)]


def rwray_epoch(params, data: list[Batch], device: torch.device, amp: str) -> Callable[[], None]:
    torch.manual_seed(0)  # every variant starts from the same weights
    model = MODELS.build(ResNet32Params(), INFO).to(device)
    method = METHODS.build(params, INFO)
    method.attach(model, lambda m: m, device)
    method.begin_epoch(0)
    opt = build_optimizer(OPTIM, model.parameters())
    return lambda: train_epoch(model, method, opt, data, epoch=0, amp=amp)


def plain_epoch(data: list[Batch], device: torch.device, amp: str) -> Callable[[], None]:
    torch.manual_seed(0)
    model = MODELS.build(ResNet32Params(), INFO).to(device)
    opt = build_optimizer(OPTIM, model.parameters())
    dtype = torch.bfloat16 if amp == "bf16" else None

    def run() -> None:
        model.train()
        for b in data:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(b.x), b.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(steps: int, batch: int, rounds: int, warmup: int, device: torch.device) -> dict:
    amp = "bf16" if device.type == "cuda" else "none"
    data = batches(steps, batch, device)
    variants = {"plain": plain_epoch(data, device, amp)}
    variants.update({k: rwray_epoch(p, data, device, amp) for k, p in METHOD_VARIANTS.items()})
    peak = {}
    for name, fn in variants.items():  # warm-up: cuDNN autotuning, allocator, lazy imports
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            fn()
        sync(device)
        peak[name] = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    times = {name: [] for name in variants}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    images = steps * batch
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "amp": amp, "batch": batch, "steps": steps, "rounds": rounds,
           "warmup": warmup, "times": times, "peak_bytes": peak,
           "images_s": {n: images / statistics.median(t) for n, t in times.items()},
           "started": datetime.now(timezone.utc).isoformat()}
    # paired per round: the same round's ERM (or plain) epoch is the reference
    out["erm_vs_plain"] = statistics.median(p / e for p, e in zip(times["plain"], times["erm"]))
    out["vs_erm"] = {n: statistics.median(t / e for t, e in zip(times[n], times["erm"]))
                     for n in METHOD_VARIANTS if n != "erm"}
    return out


def render(r: dict) -> str:
    ok = lambda b: "met" if b else "**missed**"  # noqa: E731
    erm, vs_plain = r["images_s"]["erm"], r["erm_vs_plain"]
    rows = [f"| {n} | {r['images_s'][n]:,.0f} | {r['vs_erm'][n]:.2f}x | {r['peak_bytes'][n] / 2**30:.2f} |"
            for n in r["vs_erm"]]
    return f"""## GPU check: ResNet-32 training step, rwray vs a plain torch loop, methods vs ERM

Generated {r['started'][:16].replace('T', ' ')} UTC by `python bench/gpu_check.py` on {r['device']} (torch
{r['torch']}), autocast {r['amp']}, B={r['batch']}, {r['steps']} steps an epoch, {r['rounds']} rounds after
{r['warmup']} warm-up epochs per variant, every variant once a round in a random order; data on the GPU. See the
script's docstring for what each side does.

| measurement | value | goal | verdict |
|---|---:|---|---|
| plain torch loop (images/s) | {r['images_s']['plain']:,.0f} | | |
| rwray `train_epoch`, ERM + CE (images/s) | {erm:,.0f} | >= {GOAL_IMAGES_S:,} | {ok(erm >= GOAL_IMAGES_S)} |
| rwray ERM / plain (throughput ratio, paired per round) | {vs_plain:.3f}x | >= {GOAL_VS_PLAIN} | {ok(vs_plain >= GOAL_VS_PLAIN)} |
| peak GPU memory, ERM / plain (GiB) | {r['peak_bytes']['erm'] / 2**30:.2f} / {r['peak_bytes']['plain'] / 2**30:.2f} | | |

| method (rwray `train_epoch`) | images/s | step time / ERM's (paired) | peak GPU memory (GiB) |
|---|---:|---:|---:|
{chr(10).join(rows)}

Epoch times per round (s): {'; '.join(f"{n} " + ', '.join(f'{t:.3f}' for t in ts) for n, ts in r['times'].items())}.
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "benchmarks-gpu.md")
    ap.add_argument("--steps", type=int, default=None, help="batches an epoch (default: 100 on GPU, 2 on CPU)")
    ap.add_argument("--rounds", type=int, default=None, help="default: 7 on GPU, 2 on CPU")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    r = measure(a.steps or (100 if gpu else 2), a.batch, a.rounds or (7 if gpu else 2), a.warmup if gpu else 1,
                device)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(r, indent=1))
    a.out.write_text(render(r))
    print(a.out.read_text(), flush=True)


if __name__ == "__main__":
    main()
