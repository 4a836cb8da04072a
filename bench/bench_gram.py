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

import rwray.gram as gm  # noqa: E402
from rwray.datainfo import DataInfo  # noqa: E402
from rwray.methods import METHODS, StepInputs, weighted_loss  # noqa: E402
from rwray.methods.batch_reweight import BatchReweightParams, cosine, pscores  # noqa: E402
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


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes this call allocated and still holds, relative to its start: PyTorch CPU-allocator
    allocation events from the torch profiler (profile_memory=True). Blocks that existed before the call are not
    counted, nor are their frees (the profiler does not report those)."""
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
    level = peak = 0
    for e in allocs:
        size, ptr = e.extra_fields.alloc_size, e.extra_fields.ptr
        if size > 0:
            live.add(ptr)
        elif ptr in live:
            live.discard(ptr)
        else:
            continue  # a block from before the call
        level += size
        peak = max(peak, level)
    return peak


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
    mem = {k: peak_bytes(f) for k, f in runs.items()} if norm == "group" else {}
    if norm == "group":  # a batch-reweighting step on the vmap reference Gram, for the memory comparison only
        model = copy.deepcopy(base).train()
        method = METHODS.build(BatchReweightParams(impl="reference"), INFO)
        method.attach(model, prepare=lambda m: m, device=torch.device("cpu"))

        def ref_step() -> None:
            logits, feats = model(x, return_features=True)
            weighted_loss(method.step(StepInputs(model, x, y, index, logits, feats, 0, 0))).backward()
            model.zero_grad(set_to_none=True)

        ref_step()
        mem["br_reference"] = peak_bytes(ref_step)
    med = {k: statistics.median(v) for k, v in t.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    out = {"norm": norm, "repeats": repeats, "wall": med, "cpu": cmed, "raw": t, "mem": mem,
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
    max_dS = (cosine(state["G_fast"]) - cosine(state["G_ref"])).abs().max().item()
    same_p = torch.equal(pscores(cosine(state["G_fast"]), 0.7), pscores(cosine(state["G_ref"]), 0.7))
    # Which float32 result is closer to the float64 one (the fast path is exact in float64: tests/test_gram.py)?
    close_cap()
    S64 = cosine(gm.gram(copy.deepcopy(model).double(), x.double(), y, ce))
    err32 = {k: (cosine(state[f"G_{k}"]) - S64).abs().max().item() for k in ("fast", "ref")}

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

    # Memory, one profiled call each: peak of the call's own allocations.
    mem = {}
    for name, fn in (("in_step_fast", in_step_fast), ("in_step_keep", in_step_keep), ("in_step_ref", in_step_ref)):
        open_cap()
        mem[name] = peak_bytes(fn)
        state.pop("kept", None)
    close_cap()
    mem["standalone_fast"] = peak_bytes(standalone_fast)
    mem["standalone_ref"] = peak_bytes(standalone_ref)
    return {"repeats": repeats, "d": d, "max_dS": max_dS, "same_p": same_p, "err32": err32, "time": med, "cpu": cmed, "raw": times,
            "mem": mem, "bxd_bytes": len(y) * d * 4}


# ----- report -----------------------------------------------------------------------------------------------------
def verdict(ok: bool, got: float, goal: float, better: str) -> str:
    """'met', or how far off: over a ceiling by got/goal - 1, short of a floor by 1 - got/goal."""
    if ok:
        return "met"
    if better == "lower":
        return f"**missed**: {100 * (got / goal - 1):.0f} % over"
    return f"**missed**: {100 * (1 - got / goal):.0f} % short"


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
             "per-sample contribution, see `rwray/gram/__init__.py`).")
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
             f"(float32 both; against float64: fast {g['err32']['fast']:.1e}, reference {g['err32']['ref']:.1e}); "
             f"p-scores at gamma 0.7 {'identical' if g['same_p'] else 'DIFFERENT'}. {g['repeats']} "
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
          "events (`profile_memory=True`), one profiled call each: the peak of what the call itself allocates and "
          "holds, relative to its start (the profiler does not report frees of older blocks, so a call that frees "
          "older tensors is not credited). In-step calls start after the loop's forward, whose graph is held in "
          "every case and not counted. *fast + records* is the grad-reuse pass (the method's default with "
          "GroupNorm): it also keeps each conv's output gradient for the loop's backward (while freeing the "
          f"forward graph as it goes, which is not credited here). For scale: B x d float32 per-sample gradients "
          f"are {g['bxd_bytes'] / mib:.0f} MiB.", "",
          "| view | fast (MiB) | reference (MiB) | reference / fast | goal | verdict |", "|---|---|---|---|---|---|"]
    rows = [("in-step Gram", "in_step_fast", "in_step_ref"), ("in-step Gram + records (grad reuse)", "in_step_keep", "in_step_ref"),
            ("standalone `gram()`", "standalone_fast", "standalone_ref")]
    for label, f, rname in rows:
        r = m[rname] / m[f]
        L.append(f"| {label} | {m[f] / mib:.0f} | {m[rname] / mib:.0f} | {r:.1f}x | >= {GOALS['memory']}x | "
                 f"{verdict(r >= GOALS['memory'], r, GOALS['memory'], 'higher')} |")
    sm = next(s["mem"] for s in steps if s["norm"] == "group")
    if sm:
        extra = {k: v - sm["erm"] for k, v in sm.items()}
        L += ["", "Whole training step (forward, method, backward; GroupNorm), peak allocated from the step's start, "
              "so every block is counted and freed blocks are credited. The increment over ERM is what the method "
              "costs in memory:", "", "| step | peak (MiB) | over ERM (MiB) |", "|---|---|---|"]
        names = {"erm": "ERM", "br": "BR, fast Gram, grad reuse (default)", "br_noreuse": "BR, fast Gram, grad_reuse=false",
                 "br_reference": "BR, reference (vmap) Gram"}
        for k in ("erm", "br", "br_noreuse", "br_reference"):
            if k in sm:
                L.append(f"| {names[k]} | {sm[k] / mib:.0f} | {extra[k] / mib:+.0f} |")
        if extra.get("br", 0) > 0 and "br_reference" in extra:
            L.append("")
            L.append(f"Extra memory of a batch-reweighting step, reference / fast: {extra['br_reference'] / extra['br']:.1f}x "
                     f"(grad reuse on), {extra['br_reference'] / max(extra['br_noreuse'], 1):.1f}x (off).")
    L += ["", "Raw seconds per repeat (in run order):", ""]
    for s in steps:
        L.append(f"- step {s['norm']}: " + "; ".join(f"{k} {', '.join(f'{v:.3f}' for v in vals)}" for k, vals in s["raw"].items()))
    for k, v in g["raw"].items():
        L.append(f"- gram {k.replace('_', '-')}: {', '.join(f'{v_:.3f}' for v_ in v)}")
    L += ["", meta["notes"], END]
    return "\n".join(L) + "\n"


NOTES = """Why the numbers are what they are (cost model per step, B = 128; F = forward, Bi = input-gradient half of
a backward, Bw = weight-gradient half, all of a similar size for these convs on CPU):
- ERM: F + Bi + Bw.
- Batch reweighting adds one partial backward of sum_i l_i (Bi: it stops at the first conv's output and computes
  no parameter gradient), every sample's own conv weight gradients (one convolution-backward with the batch folded
  into the groups: the flops of Bw, measured 1-2x its time, worst on the last stage's 8x8 maps), and one
  [B, d_layer] x [d_layer, B] product per layer (B^2 d = 7.6 G multiply-adds here, the single largest extra; exact
  cosines need it). Linear layers use (A Aᵀ) ∘ (E Eᵀ) and norm layers a [B, 2C] product: negligible.
- grad_reuse=false: the loop's backward then walks the retained graph again (Bi + Bw).
- grad reuse (the default where verified exact; never with BatchNorm in training mode, whose samples are
  coupled): the loop's backward is rebuilt from the Gram pass's records, c @ M for the layers whose per-sample
  gradients M were kept (ResNet-32's first two stages and the norm layers) and a weighted weight-gradient for the
  rest, so it costs a fraction of Bw instead of Bi + Bw.
- What is left above ERM is Bi + (per-sample weight gradients) + B^2 d, all needed for an exact B x B Gram at
  every step. Without grad reuse the GroupNorm goal of 1.8x is out of reach (the loop's second walk of the graph
  alone adds Bi + Bw); with it the margin is small, and runs under heavy load from other jobs on these 2 shared
  cores have measured above 1.8x (up to ~2.5x), so read the ratio together with the load average above.
- The vmap reference is not a slow strawman on CPU: PyTorch's batching rule for the conv weight gradient is the
  same grouped convolution the fast path uses, and it does the same B^2 d products. Its extra cost is one vmapped
  forward (plus its graph), and its memory is B x d at once. So the fast path wins clearly *in-step* (it reuses
  the loop's forward) and in memory, but *standalone* (both paying a forward) they differ by little: about 1.1-1.2x
  in CPU time, so that wall-clock row lands on either side of the 1.5x goal depending on load (a quiet run, load
  average ~1, measured 1.10x).
- The *standalone* memory row counts the fast path's own forward graph (about ERM's forward, which any backward
  needs); the in-step rows and the whole-step table isolate what the Gram itself costs."""


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
    print("memory MiB: " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in m.items()) + "; steps " +
          ", ".join(f"{k} {v / 2**20:.0f}" for k, v in steps[0]["mem"].items()) +
          f"; max|dS| {gr['max_dS']:.1e}  [{time.perf_counter() - t0:.0f}s]", flush=True)
    meta["load_end"] = load()
    write_section(args.out, report(steps, gr, meta))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
