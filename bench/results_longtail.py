"""Long-tailed digits: ERM vs reweighting, through the real product path. Writes one section of docs/results.md.

For each imbalance factor (exp, IF 10 and 50; the `digits` source, 15 validation images per class) and each method
(ERM, Balanced Softmax, ABSGD, LDAM-DRW, ABSGD + Balanced Softmax), 3 training seeds are run with
`rwray.train.launch.run(cfg)`, configs built from jobs/longtail/digits_*.yaml + overrides, recorded in a local MLflow
sqlite store under bench/out/longtail/ (git-ignored). Every number reported is a TEST number at the epoch chosen on
VALIDATION balanced accuracy (`best/test/...` of the run); the test split never chooses anything.

ABSGD's λ is chosen per imbalance factor on validation only: each value of a small grid is run on seed 0 and the
one with the best `best/val/balanced_acc` is kept (ties: the higher mean val balanced accuracy over the last 5
epochs, then grid order); that seed-0 run is then reused as
the method's seed-0 result, and seeds 1 and 2 are run with the chosen λ. ABSGD + Balanced Softmax reuses the λ
chosen for ABSGD + CE (it is not tuned separately: time).

Ray is started once here, so each run pays only the trainer's start-up, not Ray's. The rwray package is frozen into
bench/out/code/<hash> first and imported from there by the driver and every Ray worker (see `snapshot_code`). Results go to
bench/out/longtail/results.json as they arrive; `--resume` skips runs already there and `--report-only` rewrites
the docs section from that file.

    nohup .venv/bin/python bench/results_longtail.py > bench/out/results.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs" / "longtail"
SECTION = "## Long-tailed digits: ERM vs reweighting"
KEY = "results-longtail-digits"  # the section's markers in docs/results.md (rwray.report.replace_section)

# key -> (label in the table, job file). Order = row order; a second stage comes after the first stage it starts from.
METHODS = {
    "erm": ("ERM (CE)", "digits_erm.yaml"),
    "balanced_softmax": ("Balanced Softmax", "digits_balanced_softmax.yaml"),
    "bs_autoaugment": ("Balanced Softmax + AutoAugment + Cutout", "digits_balanced_softmax.yaml"),
    "absgd": ("ABSGD (CE)", "digits_absgd.yaml"),
    "ldam_drw": ("LDAM-DRW", "digits_ldam_drw.yaml"),
    "absgd_bs": ("ABSGD + Balanced Softmax", "digits_absgd_balanced_softmax.yaml"),
    "cb_sampler": ("ERM, class-balanced sampling", "digits_class_balanced.yaml"),
    "sqrt_sampler": ("ERM, square-root sampling", "digits_sqrt_sampler.yaml"),
    "crt": ("cRT on the ERM model", "digits_crt.yaml"),
    "lws": ("LWS on the ERM model", "digits_lws.yaml"),
    "tau_norm": ("τ-norm on the ERM model", "digits_tau_norm.yaml"),
    "bs_decoupled": ("Balanced Softmax re-trained on the ERM model", "digits_bs_decoupled.yaml"),
    "balms": ("BALMS (+ Meta Sampler weights) on the ERM model", "digits_balms.yaml"),
}
# Overrides of a row beyond its job file: the official Balanced Meta-Softmax augmentation, scaled to 8 px images.
EXTRA = {"bs_autoaugment": ["data.policy=autoaugment", "data.autoaugment_policy=cifar10", "data.cutout=4"]}
STAGE1 = "erm"  # decoupled second stages start from this method's final checkpoint of the same IF and seed
STAGE2 = ("crt", "lws", "tau_norm", "bs_decoupled", "balms")  # their own epochs (the job's), not --epochs
TUNED = "absgd"  # λ tuned on val for this method ...
SHARES_LAMBDA = "absgd_bs"  # ... and reused by this one
TAU = "tau_norm"  # τ tuned on val (seed 0), like λ
PARAM = {TUNED: "lam", SHARES_LAMBDA: "lam", TAU: "tau"}  # the tuned value's name in run keys


def run_key(method: str, factor: int, seed: int, value: float | None) -> str:
    return f"{method}/if{factor}/s{seed}" + (f"/{PARAM[method]}{value:g}" if value is not None else "")


def chosen(res: dict, method: str, factor: int) -> float | None:
    """The tuned value a method's rows use (λ, τ), or None for methods with nothing tuned."""
    table = {"lam": "lambda", "tau": "tau"}.get(PARAM.get(method, ""))
    return res.get(table, {}).get(str(factor), {}).get("chosen") if table else None


def build_config(method: str, factor: int, seed: int, args: argparse.Namespace, value: float | None = None,
                 init_from: str | None = None):
    """The job file + the overrides that make it this cell of the grid. Same data/model/optim for every method;
    ``value`` is the tuned λ or τ, ``init_from`` a second stage's first-stage checkpoint."""
    from rwray import config as C

    out = args.out.resolve()
    overrides = [
        f"output_dir={out / 'longtail'}",  # one MLflow sqlite store for the whole benchmark
        f"data.dir={out / 'data' / f'digits-exp{factor}'}",
        "data.builder.imbalance=exp",
        f"data.builder.factor={factor}",
        "data.builder.val_per_class=15",
        "data.builder.seed=0",  # the data split is fixed: seeds vary the training only (paired comparisons)
        f"train.seed={seed}",
        "train.select_metric=val/balanced_acc",
        f"scaling.num_workers={args.workers}",
        f"tracking.experiment=longtail-digits-if{factor}",
        f"tracking.run_name={method}-if{factor}-seed{seed}" + (f"-{PARAM[method]}{value:g}" if value is not None else ""),
        *EXTRA.get(method, []),
    ]
    if method not in STAGE2:
        overrides.append(f"train.epochs={args.epochs}")
    if init_from is not None:
        overrides.append(f"train.init_from={init_from}")
    if method == "ldam_drw":  # deferred re-weighting at ~2/3 of training, whatever the epoch count
        overrides.append(f"method.loss.drw_epoch={round(2 * args.epochs / 3)}")
    if value is not None:
        overrides.append(f"{'method.lam' if PARAM[method] == 'lam' else 'train.tau_norm'}={value}")
    return C.load(JOBS / METHODS[method][1], overrides)


def fmt_ms(xs: list[float]) -> str:
    """'mean ± std' in %, sample std over seeds; '—' when nothing ran."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "—"
    m = 100 * statistics.fmean(xs)
    s = 100 * statistics.stdev(xs) if len(xs) > 1 else float("nan")
    return f"{m:.1f} ± {s:.1f}" + ("" if len(xs) >= 3 else f" (n={len(xs)})")


# ---------------------------------------------------------------------------------------------------------- running


def snapshot_code(out: Path) -> dict:
    """Freeze the rwray package for the whole benchmark and import it from the copy, in the driver and in every Ray
    worker (PYTHONPATH is inherited by the raylet and its workers).

    Why: Ray Train workers are fresh processes that import rwray when they start, so on a shared working tree an
    edit made by someone else mid-benchmark would silently mix code versions between runs (and between this driver
    and its workers: a first attempt lost 9 of 32 runs to exactly that). Must run before anything imports rwray.
    """
    import hashlib
    import shutil
    import subprocess

    src = ROOT / "rwray"
    files = sorted(p for p in src.rglob("*.py") if "__pycache__" not in p.parts)
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(src)).encode() + b"\0" + f.read_bytes())
    digest = h.hexdigest()[:12]
    dest = out.resolve() / "code" / digest
    if not (dest / "rwray").is_dir():
        shutil.copytree(src, dest / "rwray", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(dest))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(dest), *filter(None, [os.environ.get("PYTHONPATH")])])
    # Ray puts the driver's working directory first on its workers' sys.path, and the repo root holds rwray/: run
    # from the snapshot so that entry is the copy too (every path this script uses is absolute).
    os.chdir(dest)

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    return {"code_sha256_12": digest, "code_snapshot": str(dest), "git_head": git("rev-parse", "--short", "HEAD"),
            "git_dirty_rwray": git("status", "--short", "--", "rwray").splitlines()}


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}, "lambda": {}, "meta": {}}


def save_results(path: Path, res: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, sort_keys=True))
    tmp.replace(path)  # atomic: a kill mid-write never leaves a half file


def execute(cfg, key: str, res: dict, path: Path, progress: dict) -> dict | None:
    from rwray.train.launch import run

    if key in res["runs"] and "error" not in res["runs"][key]:
        return res["runs"][key]
    t0 = time.perf_counter()
    try:
        r = run(cfg)
        m = r.metrics
        rec = {"run_id": r.run_id, "seconds": time.perf_counter() - t0, "best_epoch": int(m["best/epoch"]),
               "checkpoint": r.checkpoint_path,
               "code": res["meta"].get("code_sha256_12"), "val_tail_mean": val_tail_mean(r.tracking_uri, r.run_id),
               "val_balanced_acc": m["best/val/balanced_acc"],
               **{f"test_{k}": m.get(f"best/test/{k}") for k in ("balanced_acc", "few_acc", "medium_acc", "many_acc", "top1")}}
    except Exception as e:  # one failed cell must not lose the other 30: record it, go on, show it in the table
        traceback.print_exc()
        rec = {"error": f"{type(e).__name__}: {e}"[:500], "seconds": time.perf_counter() - t0}
    res["runs"][key] = rec
    save_results(path, res)
    progress["done"] += 1
    progress["spent"] += rec["seconds"]
    elapsed = time.perf_counter() - progress["t0"]
    left = progress["total"] - progress["done"]
    eta = left * progress["spent"] / max(progress["done"], 1)
    if "error" in rec:
        print(f"[{progress['done']:>2}/{progress['total']}] {key}: FAILED {rec['error']}", flush=True)
    else:
        print(f"[{progress['done']:>2}/{progress['total']}] {key:<28} val bal {100 * rec['val_balanced_acc']:5.1f} "
              f"@ epoch {rec['best_epoch'] + 1:>2} -> test bal {100 * rec['test_balanced_acc']:5.1f}  few "
              f"{100 * rec['test_few_acc']:5.1f}   {rec['seconds']:4.0f} s   elapsed {elapsed / 60:4.1f} min, "
              f"~{eta / 60:.1f} min left", flush=True)
    return rec


def val_tail_mean(uri: str, run_id: str, last: int = 5) -> float | None:
    """Mean validation balanced accuracy over the last `last` epochs: a steadier validation score, used only to break
    ties in the λ choice (with 15 images per class, best-epoch validation scores tie often)."""
    from mlflow.tracking import MlflowClient

    hist = sorted(MlflowClient(uri).get_metric_history(run_id, "val/balanced_acc"), key=lambda m: m.step)
    return statistics.fmean(m.value for m in hist[-last:]) if hist else None


def run_all(args: argparse.Namespace, res: dict, path: Path) -> None:
    import ray

    from rwray.train.preflight import ensure_data, resolve_paths
    from rwray.train.rayenv import quiet_data

    t_start = time.perf_counter()
    # Once for the whole benchmark: each run then only pays the trainer's start-up. 4 logical CPUs so Ray Data's
    # read tasks always find a slot next to the train worker (ray-stack.md: otherwise a run can hang).
    # log_to_driver=False: the workers' per-epoch lines stay in Ray's session logs and MLflow, not in this log.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    quiet_data()
    import rwray

    worker_path = ray.get(ray.remote(lambda: __import__("rwray").__file__).remote())
    res["meta"]["rwray_driver"], res["meta"]["rwray_worker"] = rwray.__file__, worker_path
    print(f"rwray imported from {Path(rwray.__file__).parent} (driver) and {Path(worker_path).parent} (Ray worker)",
          flush=True)
    if Path(worker_path).resolve() != Path(rwray.__file__).resolve():
        sys.exit("Ray workers import a different rwray than the driver: refusing to mix code versions")
    # One line per run from us, not one per dataset execution (set after ray.data has configured its logging).
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    print(f"ray started in {time.perf_counter() - t_start:.1f} s", flush=True)

    # Shards first (the product's own prepare + verify), so the class counts can be reported.
    for f in args.factors:
        manifest = ensure_data(resolve_paths(build_config("erm", f, 0, args)))
        counts = manifest.data_info().class_counts
        res["meta"][f"counts_if{f}"] = list(counts)
        res["meta"][f"n_val_if{f}"] = manifest.num_samples("val")
        res["meta"][f"n_test_if{f}"] = manifest.num_samples("test")
        print(f"IF {f}: train per class {list(counts)}, val {manifest.num_samples('val')}, "
              f"test {manifest.num_samples('test')}", flush=True)

    grid, taus = args.lambdas, args.taus
    per_seed = len(METHODS) - 1  # every method but the tuned one once a seed; + the grids on seed 0
    n_total = len(args.factors) * (len(grid) + len(taus) + (args.seeds - 1) * 2 + (per_seed - 1) * args.seeds)
    progress = {"done": 0, "total": n_total, "spent": 0.0, "t0": t_start}

    def pick(name: str, table: str, method: str, values: list[float], f: int, init_from: str | None = None) -> None:
        """Tune one value on seed 0, on validation only: the best selected-epoch val balanced accuracy; ties broken
        by the mean val balanced accuracy of the last 5 epochs, then by grid order (max keeps the first)."""
        scores, tails = {}, {}
        for v in values:
            rec = execute(build_config(method, f, 0, args, v, init_from), run_key(method, f, 0, v), res, path, progress)
            if rec and "error" not in rec:
                scores[v], tails[v] = rec["val_balanced_acc"], rec.get("val_tail_mean") or 0.0
        if not scores:
            print(f"IF {f}: every {method} tuning run failed; its rows stay empty", flush=True)
            return
        best = max(scores, key=lambda v: (round(scores[v], 6), round(tails[v], 6)))
        res[table][str(f)] = {"chosen": best, "val_balanced_acc": {f"{v:g}": scores.get(v) for v in values},
                              "val_tail_mean": {f"{v:g}": tails.get(v) for v in values}}
        save_results(path, res)
        print(f"IF {f}: {method} {name} {best:g} chosen on val (best-epoch val bal / last-5 mean: "
              + ", ".join(f"{v:g}: {100 * scores[v]:.1f} / {100 * tails[v]:.1f}" for v in scores) + ")", flush=True)

    def stage1(f: int, seed: int) -> str | None:
        rec = execute(build_config(STAGE1, f, seed, args), run_key(STAGE1, f, seed, None), res, path, progress)
        return rec.get("checkpoint") if rec and "error" not in rec else None

    # Phase 1: λ for ABSGD and τ for τ-norm (on the seed-0 ERM model), per imbalance factor, on seed 0.
    res.setdefault("tau", {})
    for f in args.factors:
        pick("lambda", "lambda", TUNED, grid, f)
        first = stage1(f, 0)
        if first is not None:
            pick("tau", "tau", TAU, taus, f, first)

    # Phase 2: every method x seed, seed-major so machine-load drift is spread over the methods; a second stage
    # after the ERM run of its seed.
    for seed in range(args.seeds):
        for f in args.factors:
            first = stage1(f, seed)
            for method in METHODS:
                value = chosen(res, method, f)
                if method in PARAM and value is None or method in STAGE2 and first is None:
                    continue
                key = run_key(method, f, seed, value)
                execute(build_config(method, f, seed, args, value, first if method in STAGE2 else None), key, res,
                        path, progress)

    res["meta"].update({"seconds_total": time.perf_counter() - t_start, "epochs": args.epochs, "workers": args.workers,
                        "seeds": args.seeds, "factors": args.factors, "lambda_grid": grid, "tau_grid": taus,
                        "finished_utc": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}",
                        "load_avg_end": os.getloadavg()[0]})
    save_results(path, res)


# ---------------------------------------------------------------------------------------------------------- reporting


def cell_values(res: dict, method: str, factor: int, seeds: int, metric: str) -> list[float | None]:
    value = chosen(res, method, factor)
    if method in PARAM and value is None:
        return [None] * seeds
    recs = [res["runs"].get(run_key(method, factor, s, value)) for s in range(seeds)]
    return [None if rec is None or "error" in rec else rec[metric] for rec in recs]


def paired_delta(a: list, b: list) -> str:
    """mean ± std over seeds of (method − ERM), in points; same seed = same data, same initial weights."""
    d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    if len(d) < 2:
        return "—"
    return f"{100 * statistics.fmean(d):+.1f} ± {100 * statistics.stdev(d):.1f}"


def run_span(res: dict) -> str:
    secs = sorted(r["seconds"] for r in res["runs"].values() if "error" not in r)
    return f"{secs[0]:.0f}–{secs[-1]:.0f} s (median {statistics.median(secs):.0f} s)" if secs else "?"


def section(res: dict, args: argparse.Namespace) -> str:
    meta, factors, seeds = res["meta"], args.factors, args.seeds
    lines = [
        SECTION,
        "",
        f"Generated by `.venv/bin/python bench/results_longtail.py` (finished {meta.get('finished_utc', '?')} UTC; "
        f"{meta.get('seconds_total', float('nan')) / 60:.1f} min wall on the shared 2-core CPU machine, "
        f"{len(res['runs'])} runs of {run_span(res)} each: most of a run is Ray start-up and per-epoch overhead, and "
        "the slow ones coincided with other engineers' jobs). Re-run it to regenerate this section; `--report-only` "
        "rewrites it from `bench/out/longtail/results.json`.",
        "",
        "**Setup.** scikit-learn digits (8×8, 10 classes), long-tailed with `imbalance: exp`, validation 15 images per "
        "class held out of the training pool, test 50 per class (balanced). Training images per class, head → tail: "
        + "; ".join(f"IF {f}: {meta.get(f'counts_if{f}')}" for f in factors)
        + ". Shot groups by training count: many > 100, medium 20–100, few < 20 ("
        + "; ".join(f"IF {f}: {sum(1 for c in meta.get(f'counts_if{f}', []) if c < 20)} few-shot classes" for f in factors)
        + "). One data split (builder seed 0) for all runs: the "
        f"{seeds} seeds vary initial weights, data order and augmentation only, so rows are paired by seed.",
        "",
        f"**Recipe** (jobs/longtail/digits_*.yaml): `small_cnn` width 32, SGD lr 0.05 momentum 0.9 wd 5e-4, batch 32, "
        f"1 warm-up epoch then cosine, {meta.get('epochs', args.epochs)} epochs, no augmentation, "
        f"{meta.get('workers', args.workers)} Ray Train worker per run. Each run goes through `rwray.train.launch.run` "
        "(Ray Data shards → TorchTrainer → MLflow sqlite store in `bench/out/longtail/`). The model is selected on "
        "**validation balanced accuracy** (first epoch reaching the best value); every number below is the **test** "
        "metric at that epoch (`best/test/...`).",
        "",
        "- Balanced Softmax: CE on logits + log n_c, prediction with the raw logits (τ = 1).",
        "- ABSGD: one stage, λ from epoch 0, γ = 0.9, α = 1; λ chosen per IF on validation (below).",
        f"- LDAM-DRW: cosine (normed) head, max margin 0.5, s = 30, class-balanced weights (β = 0.9999) from epoch "
        f"{round(2 * meta.get('epochs', args.epochs) / 3)} of {meta.get('epochs', args.epochs)}, the batch reduced "
        "as the seeds' `F.cross_entropy(weight=w)` (Σ w·ℓ / Σ w).",
        "- ABSGD + Balanced Softmax: ABSGD weights computed on the Balanced Softmax loss, with the λ chosen for "
        "ABSGD + CE (not tuned separately).",
        "- Class-balanced / square-root sampling: ERM (CE) on epochs that draw exact class quotas ∝ 1 / ∝ √n_c "
        "(`data.sampler`), same epoch length.",
        "- Balanced Softmax + AutoAugment + Cutout: the Balanced Meta-Softmax recipe's augmentation, scaled to 8 px: "
        "torchvision's AutoAugment (CIFAR-10 policy) per sample, then one 4 x 4 Cutout square.",
        "- Decoupled second stages (Kang et al. 2020) on the final ERM model of the same seed (features and BatchNorm "
        "statistics frozen): cRT re-draws the classifier and trains it 10 epochs on class-balanced epochs; LWS "
        "learns one scale per class, 10 class-balanced epochs; τ-norm trains nothing, it divides each class's "
        "weight vector by its norm to the power τ, τ chosen on validation (below). Their selected epoch is of the "
        "second stage; the ERM row's test numbers are at its own validation-selected epoch, not the final one "
        "the second stages start from. Balanced Softmax re-trained: a new classifier trained 10 epochs with "
        "Balanced Softmax on uniform epochs (the Balanced Meta-Softmax repository's decoupled stage); BALMS: the "
        "same plus its Meta Sampler's class rates, meta-learned on a class-balanced look-ahead loss and applied as "
        "class weights (`method: meta_sampler`, init_pow 0.3, meta lr 0.01).",
        "",
        f"**Code.** Every run imported one frozen copy of `rwray` (source hash "
        f"{', '.join(sorted({r.get('code') or '?' for r in res['runs'].values()}))}; git HEAD "
        f"{meta.get('git_head', '?')} plus {len(meta.get('git_dirty_rwray', []))} uncommitted rwray file(s) of the "
        "shared working tree at the start), in the driver and in the Ray workers, so edits made to the tree during "
        "the benchmark could not mix versions.",
        "",
    ]
    lines += ["ABSGD λ and τ-norm τ selection (seed 0; validation balanced accuracy at the selected epoch / mean over "
              "the last 5 epochs, %; the second number only breaks ties of the first, then grid order):", "",
              *grid_rows(res, "lambda", "λ", args.lambdas, factors), "", *grid_rows(res, "tau", "τ", args.taus, factors),
              ""]

    head = "| method | " + " | ".join(f"IF {f} balanced acc | IF {f} few-shot acc" for f in factors) + " |"
    lines += [f"**Test accuracy (%) at the validation-selected epoch, mean ± std over {seeds} seeds:**", "", head,
              "|---|" + "---:|---:|" * len(factors)]
    for m, (label, _) in METHODS.items():
        cells = []
        for f in factors:
            cells += [fmt_ms(cell_values(res, m, f, seeds, "test_balanced_acc")),
                      fmt_ms(cell_values(res, m, f, seeds, "test_few_acc"))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Difference to ERM, paired by seed (points, mean ± std of the per-seed differences):", "",
              head.replace("| method |", "| method |"), "|---|" + "---:|---:|" * len(factors)]
    for m, (label, _) in METHODS.items():
        if m == "erm":
            continue
        cells = []
        for f in factors:
            for metric in ("test_balanced_acc", "test_few_acc"):
                cells.append(paired_delta(cell_values(res, m, f, seeds, metric), cell_values(res, "erm", f, seeds, metric)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    # Per-seed detail: the raw numbers behind the means, with the selected epoch.
    lines += ["", "<details><summary>Per-seed test balanced / few-shot accuracy (%) and the epoch chosen on validation"
              "</summary>", "", "| method | IF | " + " | ".join(f"seed {s}" for s in range(seeds)) + " |",
              "|---|---:|" + "---|" * seeds]
    for m, (label, _) in METHODS.items():
        for f in factors:
            value = chosen(res, m, f)
            cells = []
            for s in range(seeds):
                rec = res["runs"].get(run_key(m, f, s, value)) if (value is not None or m not in PARAM) else None
                if rec is None:
                    cells.append("—")
                elif "error" in rec:
                    cells.append(f"failed: {rec['error'][:60]}")
                else:
                    cells.append(f"{100 * rec['test_balanced_acc']:.1f} / {100 * rec['test_few_acc']:.1f} "
                                 f"(ep {rec['best_epoch'] + 1})")
            lines.append(f"| {label} | {f} | " + " | ".join(cells) + " |")
    lines += ["", "</details>", ""]
    lines += ["**What we see.**", "", what_we_see(res, args), ""]
    n_test = meta.get(f"n_test_if{factors[0]}")
    lines += [f"Caveats: the test split has {n_test} images ({(n_test or 0) // 10} per class), so one image is "
              f"{100 / max((n_test or 10) // 10, 1):.0f} points of one class's recall and "
              f"{100 / max(n_test or 1, 1) :.1f} points of balanced accuracy; validation has 15 per class, so "
              "epoch selection is itself noisy. This is a small CPU smoke-scale comparison, not a reproduction of "
              "the papers' CIFAR-LT numbers (jobs/longtail/cifar10_lt_*.yaml are the recipes for that).", ""]
    return "\n".join(lines)


def grid_rows(res: dict, table: str, symbol: str, values: list[float], factors: list[int]) -> list[str]:
    rows = ["| IF | " + " | ".join(f"{symbol} = {v:g}" for v in values) + " | chosen |",
            "|---|" + "---:|" * len(values) + "---:|"]
    for f in factors:
        info = res.get(table, {}).get(str(f))
        if not info:
            rows.append(f"| {f} | " + " | ".join("—" for _ in values) + " | — |")
            continue
        vals, tails = info["val_balanced_acc"], info.get("val_tail_mean", {})

        def cell(v: float) -> str:
            a, t = vals.get(f"{v:g}"), tails.get(f"{v:g}")
            return "—" if a is None else f"{100 * a:.1f}" + ("" if t is None else f" / {100 * t:.1f}")

        rows.append(f"| {f} | " + " | ".join(cell(v) for v in values) + f" | {info['chosen']:g} |")
    return rows


def _paired(res: dict, args: argparse.Namespace, m: str, base: str, f: int, metric: str) -> list[float]:
    vals, ref = cell_values(res, m, f, args.seeds, metric), cell_values(res, base, f, args.seeds, metric)
    return [x - y for x, y in zip(vals, ref) if x is not None and y is not None]


def _verdict(d: list[float]) -> str:
    """'better' / 'worse' only when every seed agrees AND the mean gap exceeds its own seed-to-seed spread."""
    if len(d) < 2:
        return "n/a"
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    if all(x > 0 for x in d) and mean > sd:
        return "better"
    if all(x < 0 for x in d) and -mean > sd:
        return "worse"
    return "same"


def what_we_see(res: dict, args: argparse.Namespace) -> str:
    """Plain statements computed from the numbers (no hand-tuned wording, so a re-run cannot contradict its text)."""
    out = []
    for f in args.factors:
        erm_b = cell_values(res, "erm", f, args.seeds, "test_balanced_acc")
        if not any(v is not None for v in erm_b):
            continue
        groups: dict[str, list[str]] = {"better": [], "same": [], "worse": []}
        for m, (label, _) in METHODS.items():
            if m == "erm":
                continue
            db = _paired(res, args, m, "erm", f, "test_balanced_acc")
            df = _paired(res, args, m, "erm", f, "test_few_acc")
            if len(db) < 2:
                continue
            # A method is grouped by its balanced-accuracy verdict; the few-shot gap is reported beside it.
            groups[_verdict(db)].append(f"{label} ({100 * statistics.fmean(db):+.1f} balanced, "
                                        f"{100 * statistics.fmean(df):+.1f} few-shot"
                                        + ("" if _verdict(df) == _verdict(db) else f", few-shot: {_verdict(df)}") + ")")
        erm_f = cell_values(res, "erm", f, args.seeds, "test_few_acc")
        text = f"**IF {f}.** ERM reaches {fmt_ms(erm_b)} balanced and {fmt_ms(erm_f)} few-shot test accuracy."
        if groups["better"]:
            text += " Better than ERM on every seed, by more than the seed spread: " + "; ".join(groups["better"]) + "."
        if groups["same"]:
            text += (" Not distinguishable from ERM (seeds disagree, or the gap is within the seed spread): "
                     + "; ".join(groups["same"]) + ".")
        if groups["worse"]:
            text += " Worse than ERM on every seed: " + "; ".join(groups["worse"]) + "."
        # Does the Meta Sampler add anything over the decoupled Balanced Softmax stage it is stacked on?
        d = _paired(res, args, "balms", "bs_decoupled", f, "test_balanced_acc")
        if len(d) >= 2:
            v = {"better": "better than", "worse": "worse than", "same": "not distinguishable from"}[_verdict(d)]
            text += (f" BALMS's Meta Sampler changes the decoupled Balanced Softmax stage's balanced accuracy by "
                     f"{100 * statistics.fmean(d):+.1f} ± {100 * statistics.stdev(d):.1f} points (paired): {v} the "
                     f"stage without it.")
        # Does stacking ABSGD on Balanced Softmax add anything over Balanced Softmax alone?
        d = _paired(res, args, SHARES_LAMBDA, "balanced_softmax", f, "test_balanced_acc")
        if len(d) >= 2:
            v = {"better": "better than", "worse": "worse than", "same": "not distinguishable from"}[_verdict(d)]
            text += (f" Adding ABSGD to Balanced Softmax changes balanced accuracy by {100 * statistics.fmean(d):+.1f} "
                     f"± {100 * statistics.stdev(d):.1f} points (paired): {v} Balanced Softmax alone.")
        out.append(text)
    return "\n\n".join(out) if out else "No completed runs."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # 20, not 30: every run pays ~30-60 s of trainer start-up plus ~2 s of Ray overhead per epoch on this shared
    # 2-core machine (measured), and ERM's validation accuracy peaks within the first ~5-10 epochs on digits.
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--factors", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 3.0], help="ABSGD λ grid, tuned on val, seed 0")
    ap.add_argument("--taus", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0],
                    help="τ-norm grid, tuned on val, seed 0")
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers per run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="git-ignored output folder")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in results.json")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the docs section from results.json")
    ap.add_argument("--dry-run", action="store_true", help="build and validate every config, run nothing")
    args = ap.parse_args()
    args.out, args.doc = args.out.resolve(), args.doc.resolve()  # before snapshot_code changes the working directory

    path = args.out / "longtail" / "results.json"
    if args.dry_run:
        for f in args.factors:
            for m in METHODS:
                for s in range(args.seeds):
                    value = {"lam": args.lambdas[0], "tau": args.taus[0]}.get(PARAM.get(m, ""))
                    cfg = build_config(m, f, s, args, value, "runs/ray/STAGE-1/checkpoint_000000" if m in STAGE2 else None)
                    print(f"ok {m} IF{f} seed{s}: {cfg.method.model_dump()}")
        return
    if not args.report_only:
        path.parent.mkdir(parents=True, exist_ok=True)
        res = load_results(path) if args.resume else {"runs": {}, "lambda": {}, "meta": {}}
        res["meta"].update(snapshot_code(args.out))
        print(f"code snapshot {res['meta']['code_sha256_12']} (git HEAD {res['meta']['git_head']}, "
              f"{len(res['meta']['git_dirty_rwray'])} locally modified rwray file(s)) in {res['meta']['code_snapshot']}",
              flush=True)
        save_results(path, res)
        run_all(args, res, path)
    res = load_results(path)
    if not res["runs"]:
        sys.exit(f"no results in {path}")
    meta = res["meta"]  # report what was run, not this invocation's defaults
    args.factors = meta.get("factors", args.factors)
    args.seeds = meta.get("seeds", args.seeds)
    args.lambdas = meta.get("lambda_grid", args.lambdas)
    args.taus = meta.get("tau_grid", args.taus)
    text = section(res, args)
    from rwray.report import replace_section

    replace_section(args.doc, KEY, text)
    print(text)
    print(f"wrote the section of {args.doc}", flush=True)


if __name__ == "__main__":
    main()
