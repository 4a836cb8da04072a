"""Three new options on digits, paired by seed, through the real product path. Writes one section of docs/results.md:
`train.frozen_mode` (eval vs train) of decoupled second stages at IF 50, ReBias/Vanilla selection on a biased vs an
unbiased validation split (`data.source.val_rho`), LearnedMixin's `method.g_pretrain` (alongside vs first).

Seeds vary training only (data builder seed 0): every comparison is paired by seed. Each run is
`rwray.train.launch.run(cfg)`, cfg = job file + overrides; everything goes under bench/out/options/ (git-ignored):
MLflow store, checkpoints, shards, results.json. As bench/results_longtail.py (whose code snapshot and helpers this
reuses): Ray started once, `--resume` keeps the runs in results.json, `--report-only` only rewrites the section.

    nohup .venv/bin/python bench/results_options.py > bench/out/options.log 2>&1 &
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_longtail import ROOT, fmt_ms, load_results, run_span, save_results, snapshot_code  # noqa: E402

KEY = "results-options-digits"
SECTION = "## Three options on digits: frozen BatchNorm, unbiased selection, LearnedMixin g pre-training"
LT, RB = ROOT / "jobs" / "longtail", ROOT / "jobs" / "paper" / "digits" / "rebias"
STAGE1 = LT / "digits_erm.yaml"
IF = 50
BIASED = {"best/test_unbiased/top1": "unbiased top-1 (selected)", "best/test/top1": "biased top-1 (selected)",
          "test_unbiased/top1": "unbiased top-1, last epoch"}
# experiment -> title, change (what arm 2 does instead of arm 1), methods (key -> label, job), arms (key -> label;
# the first is the baseline of the paired deltas), metrics (run metric -> column label).
EXPERIMENTS = {
    "frozen": {"title": f"Decoupled second stage on the ERM model (digits, exp IF {IF}): frozen features' BatchNorm",
               "change": "Frozen BatchNorm in train instead of eval mode",
               "methods": {"crt": ("cRT", LT / "digits_crt.yaml"),
                           "bs_decoupled": ("Balanced Softmax re-trained", LT / "digits_bs_decoupled.yaml")},
               "arms": {"eval": "frozen_mode=eval", "train": "frozen_mode=train"},
               "metrics": {"best/test/balanced_acc": "test balanced acc", "best/test/few_acc": "test few-shot acc"}},
    "select": {"title": "ReBias / Vanilla on colour-biased digits (rho 0.997): validation split used for selection",
               "change": "Selecting on the unbiased instead of the biased validation split",
               "methods": {"rebias": ("ReBias", RB / "bdigits_rho997_rebias.yaml"),
                           "vanilla": ("Vanilla", RB / "bdigits_rho997_vanilla.yaml")},
               "arms": {"biased_val": "biased val, val/balanced_acc",
                        "unbiased_val": "unbiased val (val_rho 0.1), val/top1"},
               "metrics": BIASED},
    "g_pretrain": {"title": "LearnedMixin+H on colour-biased digits (rho 0.997): when g pre-trains",
                   "change": "Pre-training LearnedMixin's g first instead of alongside",
                   "methods": {"learned_mixin": ("LearnedMixin+H", RB / "bdigits_rho997_learned_mixin.yaml")},
                   "arms": {"alongside": "g_pretrain=alongside",
                            "first": "g_pretrain=first (+epochs, milestones shifted)"},
                   "metrics": BIASED},
}
KEEP = ("best/epoch", "best/test/balanced_acc", "best/test/few_acc", "best/test/top1", "best/test_unbiased/top1",
        "test_unbiased/top1", "test/top1", "best/val/balanced_acc", "best/val/top1")


def run_key(exp: str, method: str, arm: str, seed: int) -> str:
    return f"{exp}/{method}/{arm}/s{seed}"


def first_overrides(job: Path) -> list[str]:
    """g_pretrain=first with f's budget kept: g's pre-training epochs come on top, f's milestones move by as many."""
    from rwray import config as C

    base = C.load(job, [])
    g = base.method.g_pretrain_epochs
    shifted = ",".join(str(m + g) for m in base.schedule.milestones)
    return ["method.g_pretrain=first", f"train.epochs={base.train.epochs + g}", f"schedule.milestones=[{shifted}]"]


def build_config(exp: str, method: str, arm: str | None, seed: int, args: argparse.Namespace,
                 init_from: str | None = None):
    """The job + overrides for one cell; exp "stage1" (method "erm", arm None) is the ERM model of experiment 1."""
    from rwray import config as C

    out = args.out / "options"
    ov = [f"output_dir={out}", f"train.seed={seed}", "scaling.num_workers=1", "tracking.log_model=false",
          "tracking.system_metrics_s=0", f"tracking.experiment=options-{exp}",
          f"tracking.run_name={exp}-{method}" + (f"-{arm}" if arm else "") + f"-seed{seed}", "data.builder.seed=0"]
    if exp in ("stage1", "frozen"):
        ov += [f"data.dir={out / 'data' / f'digits-exp{IF}'}", "data.builder.imbalance=exp",
               f"data.builder.factor={IF}", "data.builder.val_per_class=15", "train.select_metric=val/balanced_acc"]
    elif arm == "unbiased_val":  # different val images: different data, its own folder
        ov += [f"data.dir={out / 'data' / 'biased-digits-rho0.997-valrho0.1'}", "data.source.val_rho=0.1",
               "train.select_metric=val/top1"]
    else:
        ov.append(f"data.dir={out / 'data' / 'biased-digits-rho0.997'}")
    if exp == "stage1":
        return C.load(STAGE1, ov + [f"train.epochs={args.epochs}"])
    job = EXPERIMENTS[exp]["methods"][method][1]
    if exp == "frozen":
        ov += [f"train.init_from={init_from}", f"train.frozen_mode={arm}"]
    elif exp == "g_pretrain":
        ov += first_overrides(job) if arm == "first" else ["method.g_pretrain=alongside"]
    return C.load(job, ov)


def cells(seed: int):
    """(exp, method, arm) of one seed in run order; the stage-2 cells follow their stage 1."""
    yield "stage1", "erm", None
    for exp, e in EXPERIMENTS.items():
        for method in e["methods"]:
            for arm in e["arms"]:
                yield exp, method, arm


# ---------------------------------------------------------------------------------------------------------- running


def execute(cfg, key: str, res: dict, path: Path, progress: dict) -> dict:
    from rwray.train.launch import run

    if key in res["runs"] and "error" not in res["runs"][key]:
        return res["runs"][key]
    t0 = time.perf_counter()
    try:
        r = run(cfg)
        rec = {"run_id": r.run_id, "seconds": time.perf_counter() - t0, "checkpoint": r.checkpoint_path,
               "code": res["meta"].get("code_sha256_12"), **{k: r.metrics.get(k) for k in KEEP}}
    except Exception as e:  # one failed cell must not lose the others: record it, go on, show it in the report
        traceback.print_exc()
        rec = {"error": f"{type(e).__name__}: {e}"[:500], "seconds": time.perf_counter() - t0}
    res["runs"][key] = rec
    save_results(path, res)
    progress["done"] += 1
    shown = "FAILED " + rec["error"] if "error" in rec else f"ep {rec['best/epoch'] + 1:.0f} " + "  ".join(
        f"{k} {100 * rec[k]:.1f}" for k in KEEP[1:] if rec.get(k) is not None)
    print(f"[{progress['done']:>2}/{progress['total']}] {key:<36} {rec['seconds']:4.0f} s  {shown}  "
          f"(elapsed {(time.perf_counter() - progress['t0']) / 60:.1f} min)", flush=True)
    return rec


def run_all(args: argparse.Namespace, res: dict, path: Path) -> None:
    import ray

    from rwray.train.preflight import ensure_data, resolve_paths
    from rwray.train.rayenv import quiet_data

    t_start = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # as results_longtail.py, for the same reasons
    quiet_data()
    import rwray

    worker = ray.get(ray.remote(lambda: __import__("rwray").__file__).remote())
    if Path(worker).resolve() != Path(rwray.__file__).resolve():
        sys.exit("Ray workers import a different rwray than the driver: refusing to mix code versions")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    print(f"rwray from {Path(rwray.__file__).parent}; ray started in {time.perf_counter() - t_start:.1f} s", flush=True)

    # The three data sets first (the product's own prepare + verify), for the setup paragraph.
    for name, cfg in {"lt": build_config("stage1", "erm", None, 0, args),
                      "biased": build_config("select", "vanilla", "biased_val", 0, args),
                      "unbiased_val": build_config("select", "vanilla", "unbiased_val", 0, args)}.items():
        m = ensure_data(resolve_paths(cfg))
        res["meta"][f"data_{name}"] = {"counts": m.class_counts("train"), "val": m.num_samples("val"),
                                       "test": m.num_samples("test")}
        print(f"data {name}: {res['meta'][f'data_{name}']}", flush=True)

    progress = {"done": 0, "total": args.seeds * len(list(cells(0))), "t0": t_start}
    for seed in range(args.seeds):  # seed-major: machine-load drift is spread over the arms
        ckpt = None
        for exp, method, arm in cells(seed):
            if exp == "frozen" and ckpt is None:
                print(f"seed {seed}: no stage-1 checkpoint, {exp}/{method}/{arm} skipped", flush=True)
                progress["done"] += 1
                continue
            rec = execute(build_config(exp, method, arm, seed, args, ckpt), run_key(exp, method, arm or "-", seed),
                          res, path, progress)
            if exp == "stage1":
                ckpt = rec.get("checkpoint")
    wall = time.perf_counter() - t_start
    res["meta"].update({"seconds_total": res["meta"].get("seconds_total", 0.0) + wall, "seconds_last": wall,
                        "invocations": res["meta"].get("invocations", 0) + 1, "seeds": args.seeds,
                        "epochs": args.epochs, "finished_utc": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}",
                        "g_first_overrides": first_overrides(EXPERIMENTS["g_pretrain"]["methods"]["learned_mixin"][1])})
    save_results(path, res)


# ---------------------------------------------------------------------------------------------------------- reporting


def values(res: dict, exp: str, method: str, arm: str, seeds: int, metric: str) -> list[float | None]:
    recs = [res["runs"].get(run_key(exp, method, arm, s)) for s in range(seeds)]
    return [None if r is None or "error" in r else r.get(metric) for r in recs]


def diffs(res: dict, exp: str, method: str, arm: str, base: str, seeds: int, metric: str) -> list[float]:
    a, b = values(res, exp, method, arm, seeds, metric), values(res, exp, method, base, seeds, metric)
    return [x - y for x, y in zip(a, b) if x is not None and y is not None]


def verdict(d: list[float]) -> str | None:
    """'higher' / 'lower' only when every seed agrees and the mean gap exceeds its own seed-to-seed spread."""
    mean, sd = (statistics.fmean(d), statistics.stdev(d)) if len(d) > 1 else (0.0, 0.0)
    if len(d) > 1 and (all(x > 0 for x in d) or all(x < 0 for x in d)) and abs(mean) > sd:
        return "higher" if mean > 0 else "lower"
    return None


def pm(d: list[float]) -> str:
    """mean ± std of per-seed differences, in points ('+0.0', never '-0.0')."""
    return f"{round(100 * statistics.fmean(d), 1) + 0.0:+.1f} ± {100 * statistics.stdev(d):.1f}" if d[1:] else "—"


def table(res: dict, exp: str, seeds: int) -> list[str]:
    e = EXPERIMENTS[exp]
    arms, base = list(e["arms"]), next(iter(e["arms"]))
    lines = [f"**{e['title']}.** Test accuracy (%), mean ± std over {seeds} seeds; Δ rows: paired by seed, points.",
             "", "| method | arm | " + " | ".join(e["metrics"].values()) + " |",
             "|---|---|" + "---:|" * len(e["metrics"])]
    for method, (label, _) in e["methods"].items():
        for arm in arms:
            lines.append(f"| {label} | {e['arms'][arm]} | " + " | ".join(
                fmt_ms(values(res, exp, method, arm, seeds, k)) for k in e["metrics"]) + " |")
        for arm in arms[1:]:
            lines.append(f"| {label} | **Δ {arm} − {base}** | " + " | ".join(
                pm(diffs(res, exp, method, arm, base, seeds, k)) for k in e["metrics"]) + " |")
    return lines + [""]


def per_seed(res: dict, seeds: int) -> list[str]:
    lines = ["<details><summary>Per seed: the metrics of each table (%) and the epoch chosen on validation</summary>",
             "", "| experiment | method | arm | " + " | ".join(f"seed {s}" for s in range(seeds)) + " |",
             "|---|---|---|" + "---|" * seeds]
    for exp, e in EXPERIMENTS.items():
        for method, (label, _) in e["methods"].items():
            for arm in e["arms"]:
                cells_ = []
                for s in range(seeds):
                    r = res["runs"].get(run_key(exp, method, arm, s))
                    cells_.append("—" if r is None else f"failed: {r['error'][:60]}" if "error" in r else
                                  " / ".join(f"{100 * r[k]:.1f}" for k in e["metrics"])
                                  + f" (ep {int(r['best/epoch']) + 1})")
                lines.append(f"| {exp} | {label} | {arm} | " + " | ".join(cells_) + " |")
    return lines + ["", "</details>", ""]


def what_we_see(res: dict, seeds: int) -> str:
    """Sentences computed from the numbers, so a re-run cannot contradict its text."""
    out = []
    for exp, e in EXPERIMENTS.items():
        base, arm = e["arms"]
        key, name = next(iter(e["metrics"].items()))  # the headline metric; the verdict covers every column
        parts = [f"{label} {pm(diffs(res, exp, m, arm, base, seeds, key))}" for m, (label, _) in e["methods"].items()]
        directed = [f"{label}'s {col} is {v} on every seed, beyond the seed spread"
                    for m, (label, _) in e["methods"].items() for k, col in e["metrics"].items()
                    if (v := verdict(diffs(res, exp, m, arm, base, seeds, k)))]
        out.append(f"{e['change']}: " + ", ".join(parts) + f" points of {name} (paired by seed) — "
                   + ("; ".join(directed) or "no difference beyond seed noise in any column") + ".")
    runs = {k: r for k, r in res["runs"].items() if k.startswith("select/") and "error" not in r}
    val = [r["best/val/top1"] for k, r in runs.items() if "/unbiased_val/" in k]
    ep = {a: sorted({int(r["best/epoch"]) + 1 for k, r in runs.items() if f"/{a}/" in k})
          for a in ("unbiased_val", "biased_val")}
    if val:
        out.append(f"The unbiased validation split itself scores little above chance (10 %) at the epochs it "
                   f"chooses (val top-1 {100 * min(val):.1f}–{100 * max(val):.1f} %): it picks epochs "
                   f"{ep['unbiased_val']} where biased validation picks {ep['biased_val']}.")
    return " ".join(out)


def section(res: dict, seeds: int) -> str:
    meta = res["meta"]
    lt, bd, uv = (meta.get(f"data_{n}", {}) for n in ("lt", "biased", "unbiased_val"))
    g_first = ", ".join(f"`{o}`" for o in meta.get("g_first_overrides", []))
    n_ok = sum("error" not in r for r in res["runs"].values())
    lines = [
        SECTION, "",
        f"Generated by `.venv/bin/python bench/results_options.py` (finished {meta.get('finished_utc', '?')} UTC; "
        f"{meta.get('seconds_total', float('nan')) / 60:.1f} min wall in {meta.get('invocations', '?')} invocation(s) "
        f"on the shared 2-core CPU machine, {n_ok} of {len(res['runs'])} runs completed, {run_span(res)} each). "
        "`--report-only` rewrites this section from `bench/out/options/results.json`; `--resume` keeps finished runs.",
        "",
        f"**Setup.** {seeds} training seeds; every data split is fixed (builder seed 0), so the arms are paired by "
        "seed. Every run is `rwray.train.launch.run(cfg)` on 1 Ray Train worker, config = job file + overrides "
        "(MLflow store, checkpoints and shards under `bench/out/options/`; no model logging, no system metrics).",
        "",
        f"1. *Frozen BatchNorm.* Stage 1: jobs/longtail/digits_erm.yaml on scikit-learn digits made long-tailed (exp, "
        f"IF {IF}; train per class {lt.get('counts')}, val {lt.get('val')} = 15 per class, test {lt.get('test')}), "
        f"{meta.get('epochs', '?')} epochs, one ERM run per seed. Stage 2 from that run's final checkpoint, "
        "jobs/longtail/digits_crt.yaml (new classifier, class-balanced epochs) and digits_bs_decoupled.yaml (new "
        "classifier, Balanced Softmax, uniform epochs), 10 epochs each, in two arms: `train.frozen_mode=eval` "
        "(rwray's default: frozen features in eval mode, BatchNorm uses and keeps the first stage's statistics) vs "
        "`train` (as the Balanced Meta-Softmax / classifier-balancing code: only gradients off, BatchNorm on batch "
        "statistics, running statistics move with the second stage's batches and are what evaluation uses). "
        "Selection on validation balanced accuracy; reported: test balanced and few-shot accuracy (the "
        f"{sum(c < 20 for c in lt.get('counts', []))} classes with < 20 training images) at that epoch.",
        f"2. *Unbiased selection.* jobs/paper/digits/rebias/bdigits_rho997_rebias.yaml and _vanilla.yaml on "
        f"`biased-digits` at rho 0.997 (train {sum(bd.get('counts', [])) or '?'}, val {bd.get('val')}, test "
        f"{bd.get('test')} biased (rho 1) and as many unbiased (rho 0.1)), 20 epochs. Arm *biased val*: the job "
        "as is, validation carved from the training pool and biased like it, selection on `val/balanced_acc`. Arm "
        f"*unbiased val*: `data.source.val_rho=0.1` (the same {uv.get('val')} validation images, recoloured as the "
        "unbiased test set is built; training images unchanged) and `train.select_metric=val/top1`, so only the "
        "chosen epoch should differ (the last-epoch column checks it). Reported: unbiased and biased test top-1 at the "
        "selected epoch, and unbiased test top-1 at the last epoch.",
        f"3. *g pre-training.* jobs/paper/digits/rebias/bdigits_rho997_learned_mixin.yaml (LearnedMixin+H, g "
        "pre-trains 1 epoch), biased data and selection as the job (biased val, `val/balanced_acc`). Arm "
        "*alongside*: g trains beside f in its pre-training epochs (the default). Arm *first*: g trains alone "
        f"first, f waits, and f keeps its budget: {g_first or '(overrides not recorded)'}. Same metrics as 2 "
        "(the per-seed epochs of *first* count g's epoch).",
        "",
        f"**Code.** Every run imported one frozen copy of `rwray` (source hash "
        f"{', '.join(sorted({r.get('code') or '?' for r in res['runs'].values()}))}; git HEAD "
        f"{meta.get('git_head', '?')} plus the uncommitted rwray changes of the shared working tree at the start: "
        f"{', '.join(f'`{x}`' for x in meta.get('git_dirty_rwray', [])) or 'none'}), in the driver and in the Ray "
        "workers, so edits made to the tree during the benchmark could not mix versions.", "",
    ]
    for exp in EXPERIMENTS:
        lines += table(res, exp, seeds)
    lines += per_seed(res, seeds)
    unb = [r[k] for key, r in res["runs"].items() if not key.startswith(("stage1", "frozen")) and "error" not in r
           for k in ("best/test_unbiased/top1", "test_unbiased/top1")]
    lines += ["**What we see.** " + what_we_see(res, seeds), "",
              f"Caveats: {lt.get('test', '?')} test images on long-tailed digits (one image is "
              f"{1000 / max(lt.get('test', 10), 1):.0f} points of one class's recall) and {seeds} seeds. At rho 0.997 "
              "the biased training set has almost no bias-conflicting images: unbiased test top-1 stays within "
              + (f"{100 * min(unb):.1f}–{100 * max(unb):.1f} %" if unb else "?") + " in every biased-digits run "
              f"(chance: 10 %), so one point is {bd.get('test', 0) / 100:.0f} of its {bd.get('test')} images. "
              "A smoke-scale CPU comparison of options, not of papers.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20, help="stage-1 ERM epochs (as results_longtail.py)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="git-ignored output folder")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in results.json")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the docs section from results.json")
    ap.add_argument("--dry-run", action="store_true", help="build and validate every config, run nothing")
    args = ap.parse_args()
    args.out, args.doc = args.out.resolve(), args.doc.resolve()  # before snapshot_code changes the working directory
    path = args.out / "options" / "results.json"
    if args.dry_run:
        for s in range(args.seeds):
            for exp, method, arm in cells(s):
                c = build_config(exp, method, arm, s, args, str(args.out / "options" / "ray" / "STAGE-1" / "ckpt"))
                print(f"ok {run_key(exp, method, arm or '-', s)}: {c.data.dir.name} {c.train.select_metric} "
                      f"epochs {c.train.epochs} {c.train.frozen_mode} {c.schedule.milestones} {c.method.model_dump()}")
        return
    if not args.report_only:
        path.parent.mkdir(parents=True, exist_ok=True)
        res = load_results(path) if args.resume else {"runs": {}, "meta": {}}
        res["meta"].update(snapshot_code(args.out))
        print(f"code snapshot {res['meta']['code_sha256_12']} (git HEAD {res['meta']['git_head']})", flush=True)
        save_results(path, res)
        run_all(args, res, path)
    res = load_results(path)
    if not res["runs"]:
        sys.exit(f"no results in {path}")
    text = section(res, res["meta"].get("seeds", args.seeds))
    from rwray.report import replace_section

    replace_section(args.doc, KEY, text)
    print(text)
    print(f"wrote the section of {args.doc}", flush=True)


if __name__ == "__main__":
    main()
