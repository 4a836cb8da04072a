"""Batch reweighting cost on CPU: ResNet-32, CIFAR-shaped random data, B = 128.

    .venv/bin/python bench/bench_gram.py            # writes its section of docs/benchmarks-gram.md

Everything compared is measured side by side in this one run, interleaved (ERM, BR, ERM, BR, ... with the order
flipped every repeat), and reported as medians; never compare numbers across runs (the machine is shared).

1. Training step, batch reweighting / ERM, GroupNorm and BatchNorm (training mode): forward, method.step,
   weighted backward, SGD step. BR uses the fast Gram over all parameters (the method's default).
2. Gram: fast (hooks) vs the torch.func vmap reference, GroupNorm model in training mode. Two views:
   in-step: what the method adds after the loop's forward (fast: one partial backward + per-layer Grams on the
   recorded forward; reference: its own vmapped forward/backward), and standalone: `gram(...)` as a function
   (the fast one runs its own forward too).
3. Peak memory of the same calls: bytes allocated by PyTorch's CPU allocator above the level at the call's start,
   from the torch profiler's allocation events (profile_memory=True). In-step measurements start after the loop's
   forward, whose graph is held in both cases.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rwray.methods import METHODS, DataInfo, StepInputs, weighted_loss  # noqa: E402
from rwray.methods import gram as gm  # noqa: E402
from rwray.methods.batch_reweight import BatchReweightParams  # noqa: E402
from rwray.methods.erm import ERMParams  # noqa: E402
from rwray.models.resnet_cifar import ResNet32Params, resnet32  # noqa: E402

BEGIN, END = "<!-- bench_gram:begin -->", "<!-- bench_gram:end -->"
INFO = DataInfo(num_classes=10, class_counts=(5000,) * 10, image_shape=(3, 32, 32), num_train=50_000)
GOALS = {"group": 1.8, "batch": 2.5, "time": 1.5, "memory": 5.0}


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def load() -> str:
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, cpu: dict[str, list[float]] | None = None
                ) -> dict[str, list[float]]:
    """Wall seconds per call, the callables run in turn each repeat, the order reversed every other repeat.
    `cpu`, when given, collects this process's CPU seconds per call too (less sensitive to other jobs' load)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.setdefault(n, []).append(time.process_time() - c0)
    return times


def peak_bytes(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak of the bytes this call allocated and still held, peak net change of allocated bytes counting frees of
    blocks that existed before the call too), both relative to the start, from the torch profiler's allocation
    events (PyTorch's CPU allocator). The first is what the call adds; the second can be lower when the call frees
    older tensors (the grad-reuse Gram pass frees the forward graph as it goes)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)

    allocs = sorted((e for e in walk(prof.profiler.kineto_results.experimental_event_tree()) if e.tag == _EventType.Allocation),
                    key=lambda e: e.start_time_ns)
    live: set[int] = set()
    own = own_peak = net = net_peak = 0
    for e in allocs:
        size, ptr = e.extra_fields.alloc_size, e.extra_fields.ptr
        net += size
        net_peak = max(net_peak, net)
        if size > 0:
            live.add(ptr)
        elif ptr in live:
            live.discard(ptr)
        else:
            continue  # a block allocated before the call: not this call's
        own += size
        own_peak = max(own_peak, own)
    return own_peak, net_peak


# ----- 1. training steps ------------------------------------------------------------------------------------------
def step_ratio(norm: str, x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict:
    """ERM vs batch reweighting (defaults) interleaved; with GroupNorm also BR with grad_reuse off."""
    torch.manual_seed(0)
    base = resnet32(ResNet32Params(norm=norm), INFO)
    index = torch.arange(len(y))
    configs = {"erm": ERMParams(), "br": BatchReweightParams()}
    if norm == "group":  # with BatchNorm in training mode reuse never applies: "br" already is the plain path
        configs["br_noreuse"] = BatchReweightParams(grad_reuse=False)
    runs, methods = {}, {}
    for name, params in configs.items():
        model = copy.deepcopy(base).train()
        method = METHODS.build(params, INFO)
        method.attach(model, prepare=lambda m: m, device=torch.device("cpu"))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def one(model=model, method=method, opt=opt) -> None:
            logits, feats = model(x, return_features=True)
            out = method.step(StepInputs(model, x, y, index, logits, feats, 0, 0))
            weighted_loss(out).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        one()  # warm-up (allocator, oneDNN primitives); for BR also the one-time grad-reuse check
        one()
        runs[name], methods[name] = one, method
    cpu: dict[str, list[float]] = {}
    t = interleaved(runs, repeats, cpu)
    med = {k: statistics.median(v) for k, v in t.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    out = {"norm": norm, "repeats": repeats, "wall": med, "cpu": cmed, "raw": t,
           "reuse": {k: getattr(m, "reuse_ok", None) for k, m in methods.items()}}
    for k in configs:
        if k != "erm":
            out[f"ratio_{k}"] = med[k] / med["erm"]
            out[f"pairs_{k}"] = statistics.median(b / a for a, b in zip(t["erm"], t[k]))
            out[f"cpu_ratio_{k}"] = cmed[k] / cmed["erm"]
    return out


# ----- 2./3. Gram: fast vs reference --------------------------------------------------------------------------------
def gram_compare(x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict:
    torch.manual_seed(0)
    model = resnet32(ResNet32Params(norm="group"), INFO).train()
    d = sum(p.numel() for p in model.parameters())
    state: dict = {"cap": None}

    def open_cap() -> None:  # exactly one capture hooked at a time (a stale one would keep graphs alive)
        close_cap()
        state["cap"] = gm.GramCapture(model)
        state["losses"] = ce(model(x), y)  # [B] the "loop's forward", recorded, made outside any timed call

    def close_cap() -> None:
        if state["cap"] is not None:
            state["cap"].close()
        state["cap"] = None
        state.pop("losses", None)

    def in_step_fast() -> None:
        state["G_fast"] = state["cap"].gram(state["losses"])

    def in_step_keep() -> None:  # the grad-reuse variant: keeps the layer records, frees the graph as it goes
        state["kept"] = state["cap"].gram_and_grads(state["losses"], retain_graph=False)[1]

    def in_step_ref() -> None:
        with state["cap"].paused():
            state["G_ref"] = gm.reference_gram(model, x, y, ce)

    def standalone_fast() -> None:
        gm.gram(model, x, y, ce, impl="fast")

    def standalone_ref() -> None:
        gm.gram(model, x, y, ce, impl="reference")

    # Correctness on the benchmark data itself.
    open_cap()
    in_step_fast()
    in_step_ref()
    max_dS = (gm.cosine(state["G_fast"]) - gm.cosine(state["G_ref"])).abs().max().item()
    same_p = torch.equal(gm.pscores(gm.cosine(state["G_fast"]), 0.7), gm.pscores(gm.cosine(state["G_ref"]), 0.7))

    # Time: the in-step pair shares one recorded forward per repeat; the standalone pair runs with no capture hooked.
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for r in range(repeats):
        open_cap()
        pair = {"in_step_fast": in_step_fast, "in_step_ref": in_step_ref}
        for k, v in interleaved(pair if r % 2 == 0 else dict(reversed(pair.items())), 1, cpu).items():
            times.setdefault(k, []).extend(v)
        close_cap()
        pair = {"standalone_fast": standalone_fast, "standalone_ref": standalone_ref}
        for k, v in interleaved(pair if r % 2 == 0 else dict(reversed(pair.items())), 1, cpu).items():
            times.setdefault(k, []).extend(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}

    # Memory, one profiled call each: (peak of this call's own allocations, peak net change incl. frees of older blocks)
    mem = {}
    for name, fn in (("in_step_fast", in_step_fast), ("in_step_keep", in_step_keep), ("in_step_ref", in_step_ref)):
        open_cap()
        mem[name] = peak_bytes(fn)
        state.pop("kept", None)
    close_cap()
    mem["standalone_fast"] = peak_bytes(standalone_fast)
    mem["standalone_ref"] = peak_bytes(standalone_ref)
    return {"repeats": repeats, "d": d, "max_dS": max_dS, "same_p": same_p, "time": med, "cpu": cmed, "raw": times,
            "mem": mem, "bxd_bytes": len(y) * d * 4}


# ----- report -----------------------------------------------------------------------------------------------------
def verdict(ok: bool, got: float, goal: float, better: str) -> str:
    if ok:
        return "met"
    miss = (got / goal - 1) if better == "lower" else (goal / got - 1)
    return f"**missed** by {100 * miss:.0f} %"


def report(steps: list[dict], g: dict, meta: dict) -> str:
    mib = 2**20
    L = [BEGIN, "## Batch reweighting: fast per-sample-gradient Gram (bench/bench_gram.py)", ""]
    L.append(f"Generated {meta['date']} by `.venv/bin/python bench/bench_gram.py` on {meta['machine']}, torch "
             f"{torch.__version__}, {torch.get_num_threads()} intra-op threads, CPU only. ResNet-32 ({g['d']:,} parameters), "
             f"CIFAR-shaped random data (3x32x32, 10 classes), B = {meta['batch']}, float32. Load average (1/5/15 min) "
             f"{meta['load_start']} at the start, {meta['load_end']} at the end: the 2 cores are shared with other jobs, "
             "so every comparison below is between calls interleaved in this one run (order flipped every repeat), "
             "reported as medians. Do not compare numbers across runs.")
    L += ["", "### Training step: batch reweighting / ERM", ""]
    L.append("A step is forward, `method.step`, `weighted_loss(...).backward()`, SGD step. Batch reweighting: defaults "
             "(all parameters, gamma 0.7, softmax weights, fast Gram). BatchNorm in training mode (the coupled "
             "per-sample contribution, see `rwray/methods/gram.py`).")
    L += ["", "| norm | variant | repeats | ERM step (s) | BR step (s) | ratio of medians | median of per-repeat "
          "ratios | CPU-time ratio | goal | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in steps:
        goal = GOALS[s["norm"]]
        for k in [k for k in s["wall"] if k != "erm"]:
            variant = {"br": "default" + (" (grad reuse on)" if s["reuse"]["br"] else " (grad reuse n/a: coupled)"),
                       "br_noreuse": "grad_reuse=false"}[k]
            r = s[f"ratio_{k}"]
            L.append(f"| {s['norm']} | {variant} | {s['repeats']} | {s['wall']['erm']:.3f} | {s['wall'][k]:.3f} | "
                     f"{r:.2f}x | {s[f'pairs_{k}']:.2f}x | {s[f'cpu_ratio_{k}']:.2f}x | <= {goal}x | "
                     f"{verdict(r <= goal, r, goal, 'lower')} |")
    L.append("")
    L.append("CPU-time ratio: the same calls' process CPU seconds (both threads), a cross-check that moves less with "
             "other jobs' load; the verdict uses the wall-clock ratio of medians.")
    t, c, m = g["time"], g["cpu"], g["mem"]
    L += ["", "### Gram: fast (hooks) vs reference (torch.func vmap), GroupNorm, all parameters", ""]
    L.append(f"Same result: max |cosine difference| {g['max_dS']:.1e} over the {meta['batch']}x{meta['batch']} matrix "
             f"(float32 both); p-scores at gamma 0.7 {'identical' if g['same_p'] else 'DIFFERENT'}. {g['repeats']} "
             "interleaved repeats. *In-step* is what the method pays after the loop's forward (fast: one partial "
             "backward plus the per-layer Grams on the recorded forward; reference: its own vmapped forward and "
             "backward). *Standalone* is `gram(model, x, y, loss_fn, impl=...)` from scratch (the fast one runs its "
             "own forward too).")
    L += ["", "| view | fast (s) | reference (s) | reference / fast | CPU-time ratio | goal | verdict |",
          "|---|---|---|---|---|---|---|"]
    for view in ("in_step", "standalone"):
        r = t[f"{view}_ref"] / t[f"{view}_fast"]
        L.append(f"| {view.replace('_', '-')} time | {t[f'{view}_fast']:.3f} | {t[f'{view}_ref']:.3f} | {r:.2f}x | "
                 f"{c[f'{view}_ref'] / c[f'{view}_fast']:.2f}x | >= {GOALS['time']}x | "
                 f"{verdict(r >= GOALS['time'], r, GOALS['time'], 'higher')} |")
    L += ["", "Peak memory, measured: bytes allocated by PyTorch's CPU allocator, from the torch profiler's allocation "
          "events (`profile_memory=True`), one profiled call each, relative to the level at the call's start: "
          "*own* counts the blocks the call allocates (its peak working set), *net* also subtracts blocks from "
          "before the call that it frees. In-step calls start after the loop's forward, whose graph is held in "
          "every case and not counted. *fast + records* is the grad-reuse pass (the method's default with "
          "GroupNorm): it keeps each conv's output gradient for the loop's backward and frees the forward graph as "
          f"it goes. For scale: B x d float32 per-sample gradients are {g['bxd_bytes'] / mib:.0f} MiB.", "",
          "| view | fast own / net (MiB) | reference own / net (MiB) | reference / fast (own) | goal | verdict |",
          "|---|---|---|---|---|---|"]
    rows = [("in-step, fast Gram", "in_step_fast", "in_step_ref"), ("in-step, fast + records", "in_step_keep", "in_step_ref"),
            ("standalone", "standalone_fast", "standalone_ref")]
    for label, f, rname in rows:
        r = m[rname][0] / m[f][0]
        L.append(f"| {label} | {m[f][0] / mib:.0f} / {m[f][1] / mib:.0f} | {m[rname][0] / mib:.0f} / {m[rname][1] / mib:.0f} | "
                 f"{r:.1f}x | >= {GOALS['memory']}x | {verdict(r >= GOALS['memory'], r, GOALS['memory'], 'higher')} |")
    L += ["", "Raw seconds per repeat (in run order):", ""]
    for s in steps:
        L.append(f"- step {s['norm']}: " + "; ".join(f"{k} {', '.join(f'{v:.3f}' for v in vals)}" for k, vals in s["raw"].items()))
    for k, v in g["raw"].items():
        L.append(f"- gram {k.replace('_', '-')}: {', '.join(f'{v_:.3f}' for v_ in v)}")
    L += ["", meta["notes"], END]
    return "\n".join(L) + "\n"


NOTES = """Why the numbers are what they are (cost model, per step, B = 128):
- ERM is forward + backward (input gradients + weight gradients).
- Batch reweighting adds, before the loop's backward: one *partial* backward of sum_i l_i that stops at the first
  conv's output and computes no parameter gradient (the brief's design: `torch.autograd.grad(..., retain_graph=True)`
  so the loop's backward still runs on the same graph); per conv layer, every sample's weight gradient in one
  convolution-backward whose groups hold the batch (same flops as the batched weight gradient); and one
  [B, d_layer] x [d_layer, B] product per layer (B^2 d multiply-adds in all, about 7.6 G here, the largest single
  term). Linear layers use (A Aᵀ) ∘ (E Eᵀ) and cost nothing in comparison; norm layers recompute x̂.
  So the step costs roughly ERM + (partial backward ~ input-gradient half of a backward) + (weight-gradient half of a
  backward) + the B^2 d Gram products, which bounds the ratio from below near 1.6-1.9x on CPU; the loop's own
  backward cannot be shared because the weights it needs come from the Gram.
- The vmap reference runs a vmapped forward and backward (PyTorch batches the per-sample conv weight gradients
  through a grouped convolution as well), then the same B^2 d products; it materialises B x d at once."""


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks: per-sample-gradient Gram matrices\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--step-repeats", type=int, default=7, help=">= 5")
    ap.add_argument("--gram-repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-gram.md")
    args = ap.parse_args()
    if args.step_repeats < 5:
        ap.error("--step-repeats must be >= 5")
    t0 = time.perf_counter()
    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "batch": args.batch, "load_start": load(),
            "machine": f"{platform.machine()} with {os.cpu_count()} CPU(s)", "notes": NOTES}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    steps = []
    for norm in ("group", "batch"):
        steps.append(step_ratio(norm, x, y, args.step_repeats))
        s = steps[-1]
        print(f"step {norm}: " + ", ".join(f"{k} {v:.3f}s" for k, v in s["wall"].items()) + "; " +
              ", ".join(f"{k[6:]} {v:.2f}x" for k, v in s.items() if k.startswith("ratio_")) +
              f"  [{time.perf_counter() - t0:.0f}s]", flush=True)
    gr = gram_compare(x, y, args.gram_repeats)
    t, m = gr["time"], gr["mem"]
    print(f"gram in-step fast {t['in_step_fast']:.3f}s ref {t['in_step_ref']:.3f}s ({t['in_step_ref'] / t['in_step_fast']:.2f}x); "
          f"standalone fast {t['standalone_fast']:.3f}s ref {t['standalone_ref']:.3f}s "
          f"({t['standalone_ref'] / t['standalone_fast']:.2f}x)", flush=True)
    print("memory own/net MiB: " + ", ".join(f"{k} {a / 2**20:.0f}/{b / 2**20:.0f}" for k, (a, b) in m.items()) +
          f"; max|dS| {gr['max_dS']:.1e}  [{time.perf_counter() - t0:.0f}s]", flush=True)
    meta["load_end"] = load()
    write_section(args.out, report(steps, gr, meta))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
