"""rwray's overhead on the quickstart job against the same job as a plain single-process torch script.

rwray: `rwray train quickstart` (the bundled recipe: long-tailed digits, small_cnn width 32, batch 32, 10 epochs,
val + test evaluated and a checkpoint reported every epoch) as a fresh subprocess, the command a user runs, with
output_dir in a temporary folder; once with scaling.num_workers=1 (the plain script's compute: one worker process,
one thread) and with the recipe's 2 workers, ROUNDS times each (medians: one start-up varies by seconds here).
Its epoch wall time is the spacing of consecutive epochs'
timestamps in the MLflow run (every epoch's metrics carry the time rank 0 reported it: `report_epoch`), so it
includes the checkpoint, the report and the logging, not only the loop's own `time/epoch_s`.

plain: this file run with --plain in a fresh process: the same shards read with pyarrow into tensors once, the same
model (`rwray.models.MODELS`), optimizer and schedule (`rwray.optim`), batch size, epochs and seed, cross-entropy,
val and test evaluated and a checkpoint torch.save'd every epoch, one thread (what a 1-CPU Ray worker gets).

    per-epoch overhead = median rwray epoch - median plain epoch          (epochs 2..N; epoch 1 has no start stamp)
    fixed overhead     = rwray total - plain total - epochs x per-epoch overhead    (median totals)
    goals: `rwray quickstart` (both jobs) <= 60 s; fixed <= 20 s; per epoch <= max(0.2 s, 10 % of the plain epoch)

The shards are prepared once before any timing; `rwray quickstart` (both recipes, in a fresh folder) is timed as a
user first runs it, first-use data preparation included. Runs interleave (ROUNDS x [plain, rwray 1 worker, rwray 2
workers], then quickstart, plain) so load drifts hit both sides.

    .venv/bin/python bench/bench_overhead.py             # docs/benchmarks-overhead.md, bench/out/overhead/results.json
    .venv/bin/python bench/bench_overhead.py --doc FILE  # the section to FILE instead, its results to FILE.json
    .venv/bin/python bench/bench_overhead.py --render-only [--doc FILE]  # the doc again from the saved results
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "overhead"
DOC = ROOT / "docs" / "benchmarks-overhead.md"
RECIPE = "quickstart"
ROUNDS = 3  # rwray runs per worker count
TIMEOUT_S = 1800


# --------------------------------------------------------------------------------------------- the plain script


def plain(settings_json: str, out_json: str) -> None:
    """The quickstart job in one process, no rwray runtime: epoch times (train + eval + checkpoint) to out_json."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F

    from rwray.datainfo import DataInfo
    from rwray.models import MODELS
    from rwray.optim import OptimConfig, ScheduleConfig, build_optimizer, build_scheduler

    torch.set_num_threads(1)  # a Ray Train worker with 1 CPU runs with OMP_NUM_THREADS=1
    s = json.loads(settings_json)
    d = Path(s["data_dir"])
    m = json.loads((d / "manifest.json").read_text())
    shape = tuple(m["image_shape"])
    mean = torch.tensor(m["mean"])[None, :, None, None]
    std = torch.tensor(m["std"])[None, :, None, None]

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        t = pq.read_table([str(d / sh["file"]) for sh in m["splits"][split]["shards"]])
        img = np.asarray(t.column("image").combine_chunks().values).reshape(-1, *shape)  # [N, C, H, W] uint8
        x = (torch.from_numpy(img.copy()).float() / 255.0 - mean) / std
        return x, torch.from_numpy(t.column("label").to_numpy().copy())

    data = {split: load(split) for split in ("train", "val", "test")}
    info = DataInfo(num_classes=m["num_classes"], class_counts=tuple(m["splits"]["train"]["class_counts"]),
                    image_shape=shape, num_train=len(data["train"][1]))
    torch.manual_seed(s["seed"])
    model = MODELS.build(MODELS[s["model"]["name"]].params(**s["model"]), info)
    opt = build_optimizer(OptimConfig(**s["optim"]), model.parameters())
    sched = build_scheduler(ScheduleConfig(**s["schedule"]), opt, s["epochs"])
    ckpt = Path(s["ckpt_dir"])
    ckpt.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(s["seed"])
    k, bs, epochs = info.num_classes, s["batch_size"], []
    for epoch in range(s["epochs"]):
        t0 = time.perf_counter()
        model.train()
        x, y = data["train"]
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), bs):
            j = order[i:i + bs]
            loss = F.cross_entropy(model(x[j]), y[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        bal = {}
        with torch.no_grad():
            for split in ("val", "test"):
                ex, ey = data[split]
                pred = torch.cat([model(ex[i:i + s["eval_batch_size"]]).argmax(1)
                                  for i in range(0, len(ey), s["eval_batch_size"])])
                cm = torch.bincount(ey * k + pred, minlength=k * k).reshape(k, k)  # [true, pred]
                bal[split] = float((cm.diag() / cm.sum(1).clamp(min=1)).mean())
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "epoch": epoch}, ckpt / "last.pt")
        epochs.append(time.perf_counter() - t0)
        print(f"epoch {epoch + 1}/{s['epochs']}  loss {loss.detach().item():.4f}  val bal-acc {100 * bal['val']:.1f}  "
              f"test bal-acc {100 * bal['test']:.1f}", flush=True)
    Path(out_json).write_text(json.dumps({"epochs": epochs, "test_balanced": bal["test"]}))


# ------------------------------------------------------------------------------------------ Ray Train's floor


def floor(workers: str, out_json: str) -> None:
    """What Ray Train costs a run that does nothing, on rwray's settings: start a local Ray the way rwray does,
    fit a trainer whose workers only report once, shut down, exit. No data, no model, no MLflow."""
    import ray
    import ray.train

    from rwray import config as C
    from rwray.train.rayenv import connect_ray, torch_trainer

    connect_ray(C.load(RECIPE))
    with tempfile.TemporaryDirectory() as tmp:
        torch_trainer(train_loop_per_worker=lambda: ray.train.report({"done": 1}),
                      scaling_config=ray.train.ScalingConfig(num_workers=int(workers)),
                      run_config=ray.train.RunConfig(name="floor", storage_path=tmp)).fit()
    ray.shutdown()
    Path(out_json).write_text("{}")
    os._exit(0)  # as `rwray` exits (rwray.cli.main): no interpreter teardown


# ------------------------------------------------------------------------------------------------- the runs


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):  # a local Ray and a local MLflow store, as a first user gets
        env.pop(k, None)
    return env


def _rwray() -> list[str]:
    exe = Path(sys.executable).with_name("rwray")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "rwray.cli"]


def _timed(cmd: list[str], cwd: Path, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=cwd, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=TIMEOUT_S).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {rc}; see {log}:\n{log.read_text()[-3000:]}")
    return wall


def run_plain(work: Path, settings: dict, i: int) -> dict:
    out = work / f"plain-{i}.json"
    s = {**settings, "ckpt_dir": str(work / f"plain-{i}-ckpt")}
    wall = _timed([sys.executable, str(Path(__file__).resolve()), "--plain", json.dumps(s), str(out)], work,
                  work / f"plain-{i}.log")
    return {"total": wall, **json.loads(out.read_text())}


def run_floor(work: Path, workers: int, i: int) -> float:
    out = work / f"floor-w{workers}-{i}.json"
    return _timed([sys.executable, str(Path(__file__).resolve()), "--floor", str(workers), str(out)], work,
                  work / f"floor-w{workers}-{i}.log")


def run_rwray(work: Path, data_dir: Path, workers: int, i: int) -> dict:
    from mlflow.tracking import MlflowClient

    from rwray.metrics import EPOCH_S, TRAIN_LOSS

    out = work / f"rwray-w{workers}-{i}"
    wall = _timed([*_rwray(), "train", RECIPE, f"output_dir={out}", f"data.dir={data_dir}",
                   f"scaling.num_workers={workers}"], work, work / f"rwray-w{workers}-{i}.log")
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run_id = runs[0].info.run_id
    stamps = sorted((h.step, h.timestamp) for h in client.get_metric_history(run_id, TRAIN_LOSS))
    loop_s = sorted((h.step, h.value) for h in client.get_metric_history(run_id, EPOCH_S))
    return {"total": wall, "stamps_ms": [t for _, t in stamps], "loop_epoch_s": [v for _, v in loop_s],
            "test_balanced": runs[0].data.metrics.get("best/test/balanced_acc")}


def main(doc: Path) -> None:
    import rwray
    from rwray import config as C
    from rwray.data import prepare

    load0 = os.getloadavg()[0]
    started = datetime.now(timezone.utc)
    cfg = C.load(RECIPE)
    work = Path(tempfile.mkdtemp(prefix="rwray-bench-overhead-"))
    try:
        data_dir = work / "data" / "digits-exp10"
        prepare(cfg.data.source, data_dir, cfg.data.builder)  # once, outside every timing
        settings = {"data_dir": str(data_dir), "model": cfg.model.model_dump(mode="json"),
                    "optim": cfg.optim.model_dump(mode="json"), "schedule": cfg.schedule.model_dump(mode="json"),
                    "batch_size": cfg.data.batch_size, "eval_batch_size": cfg.data.eval_batch_size,
                    "epochs": cfg.train.epochs, "seed": cfg.train.seed}
        plains, rw, floors = [], {1: [], 2: []}, {1: [], 2: []}
        for i in range(ROUNDS):
            plains.append(run_plain(work, settings, i))
            for w in rw:
                rw[w].append(run_rwray(work, data_dir, w, i))
                floors[w].append(run_floor(work, w, i))
        (work / "qs").mkdir()
        quickstart = _timed([*_rwray(), "quickstart"], work / "qs", work / "quickstart.log")
        plains.append(run_plain(work, settings, ROUNDS))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    raw = {"plain": plains, "rwray": rw, "floor": floors, "quickstart": quickstart, "epochs": cfg.train.epochs,
           "workers_default": cfg.scaling.num_workers, "load0": load0, "load1": os.getloadavg()[0],
           "started": started.isoformat(), "code": _code(Path(rwray.__file__).parent)}
    results = _results(doc)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(raw, indent=1))
    write(raw, doc)


def _results(doc: Path) -> Path:
    """bench/out/overhead/results.json for the docs section; beside any other --doc file (FILE.json)."""
    return OUT / "results.json" if doc == DOC else doc.with_suffix(".json")


def _code(pkg: Path) -> str:
    """Which rwray was measured: its folder, commit, and whether it had uncommitted changes."""
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(pkg), *a], capture_output=True, text=True).stdout.strip()
    sha = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "."))
    top = Path(git("rev-parse", "--show-toplevel") or pkg.parent)
    where = pkg.relative_to(top) if pkg.is_relative_to(top) else pkg  # the repository's folder, not this machine's
    return f"{where} @ {sha or '?'}{' + uncommitted changes' if dirty else ''}"


# ----------------------------------------------------------------------------------------------------- the doc


def summarize(raw: dict) -> dict:
    """The numbers the doc shows, from results.json."""
    epochs = raw["epochs"]
    plain_total = statistics.median(p["total"] for p in raw["plain"])
    plain_epoch = statistics.median(statistics.median(p["epochs"][1:]) for p in raw["plain"])
    # the plain process's own start and end (imports, reading the shards, building the model): what it costs
    # besides its epochs
    plain_start = statistics.median(p["total"] - sum(p["epochs"]) for p in raw["plain"])
    rows = {}
    for w, runs in sorted(raw["rwray"].items(), key=lambda kv: int(kv[0])):
        runs = runs if isinstance(runs, list) else [runs]  # results of the one-run version
        # each run's median spacing of consecutive epochs' stamps (epochs 2..N), then the median over runs
        epoch = statistics.median(statistics.median((b - a) / 1000 for a, b in zip(r["stamps_ms"], r["stamps_ms"][1:]))
                                  for r in runs)
        total = statistics.median(r["total"] for r in runs)
        per_epoch = epoch - plain_epoch
        rows[int(w)] = {"total": total, "totals": [r["total"] for r in runs], "epoch": epoch,
                        "loop": statistics.median(statistics.median(r["loop_epoch_s"][1:]) for r in runs),
                        "per_epoch": per_epoch, "per_epoch_pct": 100 * per_epoch / plain_epoch,
                        "fixed": total - plain_total - epochs * per_epoch,
                        "test_balanced": [r["test_balanced"] for r in runs]}
        if raw.get("floor"):
            fl = raw["floor"][w]  # keyed like raw["rwray"]: ints in memory, strings once read back from JSON
            rows[int(w)]["floor_totals"] = fl
            rows[int(w)]["floor"] = statistics.median(fl) - plain_start  # Ray Train's part of the fixed overhead
            rows[int(w)]["own"] = rows[int(w)]["fixed"] - rows[int(w)]["floor"]
    return {"plain_total": plain_total, "plain_epoch": plain_epoch, "plain_start": plain_start, "rows": rows,
            "per_epoch_goal": max(0.2, 0.1 * plain_epoch)}


def render(raw: dict) -> str:
    s = summarize(raw)
    rows, epochs, started = s["rows"], raw["epochs"], datetime.fromisoformat(raw["started"])
    cols = sorted(rows)

    def mark(ok: bool) -> str:
        return "met" if ok else "**missed**"

    def line(label: str, fmt, goal: str = "", ok=None) -> str:
        cells = " | ".join(fmt(rows[w]) for w in cols)
        verdicts = " / ".join(mark(ok(rows[w])) for w in cols) if ok else ""
        return f"| {label} | {cells} | {goal} | {verdicts} |"

    head = " | ".join(f"rwray, {w} worker{'s' if w > 1 else ''}" for w in cols)
    plain_totals = ", ".join(f"{p['total']:.1f}" for p in raw["plain"])
    plain_epochs = ", ".join(f"{statistics.median(p['epochs'][1:]):.3f}" for p in raw["plain"])
    qs_ok = raw["quickstart"] <= 60
    fixed = line("fixed (s): total - plain total - epochs x per-epoch", lambda r: f"{r['fixed']:.1f}", "<= 20 s",
                 lambda r: r["fixed"] <= 20)
    per_epoch = line("per epoch (s): rwray epoch - plain epoch", lambda r: f"{r['per_epoch']:+.3f}",
                     f"<= max(0.2 s, 10 % of plain) = {s['per_epoch_goal']:.2f} s",
                     lambda r: r["per_epoch"] <= s["per_epoch_goal"])
    pct = line("per epoch, % of the plain epoch", lambda r: f"{r['per_epoch_pct']:+.0f} %")
    floor_rows = ""
    if all("floor" in rows[w] for w in cols):
        floor_rows = "\n".join([
            line("of the fixed: Ray Train's floor (s) = floor run - plain start", lambda r: f"{r['floor']:.1f}"),
            line("of the fixed: rwray's own (s) = fixed - floor", lambda r: f"{r['own']:.1f}"),
            line("floor run, each (s): Ray start, a no-op fit, shutdown", lambda r: ", ".join(
                f"{t:.1f}" for t in r["floor_totals"]))]) + "\n"
    totals = " | ".join(f"{rows[w]['total']:.1f}" for w in cols)
    each = " | ".join(", ".join(f"{t:.1f}" for t in rows[w]["totals"]) for w in cols)
    epoch_walls = " | ".join(f"{rows[w]['epoch']:.3f}" for w in cols)
    loops = " | ".join(f"{rows[w]['loop']:.3f}" for w in cols)
    nw = raw["workers_default"]
    return f"""## Overhead on the quickstart job (rwray vs a plain torch script)

Generated {started:%Y-%m-%d %H:%M} UTC by `.venv/bin/python bench/bench_overhead.py` on {os.cpu_count()} CPU(s);
rwray from {raw['code']}. Job: the bundled `quickstart` recipe (long-tailed digits exp IF 10, `small_cnn`
width 32, batch 32, {epochs} epochs, val + test evaluated and a checkpoint written every epoch). rwray = `rwray train
quickstart` in a fresh process (local Ray, local MLflow sqlite store); its epoch = spacing of consecutive epochs'
metric timestamps in the MLflow run (train + eval + checkpoint + report + logging), median over epochs 2..{epochs}.
Plain = the same model, optimizer, schedule, shards (read with pyarrow), batch size and epochs in one fresh process
with 1 thread, evaluating and `torch.save`-ing every epoch; median of {len(raw['plain'])} runs (totals {plain_totals} s;
epoch medians {plain_epochs} s; start and end besides the epochs, median {s['plain_start']:.1f} s). rwray: median of {len(rows[cols[0]]['totals'])} runs per worker count. Runs
interleaved ({len(rows[cols[0]]['totals'])} x [plain, rwray 1 worker, rwray 2 workers], then `rwray quickstart`, plain).
The floor: `bench_overhead.py --floor N` in a fresh process, a local Ray started as rwray starts it and a trainer on
the same settings whose N workers report once and return; what any Ray Train run pays here before its first step.
Load average (1 min) {raw['load0']:.1f} at the start, {raw['load1']:.1f} at the end: absolute
times are noisy.

| measurement | {head} | plain torch |
|---|{'---:|' * len(cols)}---:|
| total wall, median (s) | {totals} | {s['plain_total']:.1f} |
| total wall, each run (s) | {each} | {plain_totals} |
| epoch wall, median of epochs 2..{epochs} (s) | {epoch_walls} | {s['plain_epoch']:.3f} |
| the loop's own `time/epoch_s` (train + eval), median (s) | {loops} | - |

| overhead | {head} | goal | verdict |
|---|{'---:|' * len(cols)}---|---|
{fixed}
{floor_rows}{per_epoch}
{pct}

| `rwray quickstart` (both recipes, {nw} workers, first use: shards prepared) | wall (s) | goal | verdict |
|---|---:|---|---|
| ERM then Balanced Softmax, one command | {raw['quickstart']:.1f} | <= 60 s | {mark(qs_ok)} |
"""


def write(raw: dict, doc: Path) -> None:
    text = render(raw)
    doc.write_text(text)
    print(text)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--plain"]:
        plain(args[1], args[2])
    elif args[:1] == ["--floor"]:
        floor(args[1], args[2])
    elif args[:1] == ["--render-only"]:  # rewrite the doc from the last run's results
        doc = Path(args[2]) if args[1:2] == ["--doc"] else DOC
        write(json.loads(_results(doc).read_text()), doc)
    else:
        main(Path(args[1]) if args[:1] == ["--doc"] else DOC)
