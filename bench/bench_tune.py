"""Tune overhead: a 4-trial sweep's wall time against 4 x one trial's wall time, same machine, same run.

One trial's work, run alone: the job through `rwray.train.launch.run`, which is exactly what a Tune trial's driver
calls (TorchTrainer start-up, training, evaluation, MLflow). The sweep: `rwray.sweep.sweep` over a 4-value grid of
`optim.lr`, FIFO (no trial is stopped early), so it runs the same 4 jobs plus Tune's own machinery (trial actors,
per-epoch results streamed back, the parent MLflow run, best.yaml and the summary). Ray is started once, before
anything is timed, and the runs are interleaved (single, sweep, single, sweep, single) so load drifts hit both.

    serial overhead   = sweep with max_concurrent 1  / (4 x median single run)     (the issue sets no goal)
    concurrent        = sweep with max_concurrent 2  / (4 x median single run)     what 2 trials at a time give here

    .venv/bin/python bench/bench_tune.py                  # writes docs/benchmarks-tune.md (+ bench/out/tune/results.json)
    .venv/bin/python bench/bench_tune.py --render-only    # the doc again from that file
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "tune"
DOC = ROOT / "docs" / "benchmarks-tune.md"
LRS = [0.02, 0.05, 0.1, 0.2]
EPOCHS = 3


def job(name: str, **extra):
    from rwray import config as C

    raw = {"name": name, "output_dir": str(OUT / "runs"),
           "data": {"dir": str(OUT / "data" / "digits-exp10"), "source": {"name": "digits"},
                    "builder": {"imbalance": "exp", "factor": 10, "val_per_class": 15, "seed": 0}, "batch_size": 32},
           "model": {"name": "small_cnn", "width": 16}, "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
           "schedule": {"name": "cosine"}, "train": {"epochs": EPOCHS, "seed": 0}, "scaling": {"num_workers": 1},
           "tracking": {"experiment": "bench-tune"}, **extra}
    return C.validate(raw, name)


def single(i: int) -> float:
    from rwray.train.launch import run

    cfg = job("bench-single", tracking={"experiment": "bench-tune", "run_name": f"single-{i}-{time.time_ns()}"})
    t0 = time.perf_counter()
    run(cfg)
    return time.perf_counter() - t0


def sweep(concurrent: int) -> float:
    from rwray.sweep import sweep as run_sweep

    cfg = job(f"bench-sweep-c{concurrent}-{time.time_ns()}",
              tune={"space": {"optim.lr": {"grid": LRS}}, "metric": "val/balanced_acc", "mode": "max",
                    "num_samples": 1, "max_concurrent": concurrent, "scheduler": {"name": "fifo"}, "search": "grid"})
    t0 = time.perf_counter()
    result = run_sweep(cfg)
    wall = time.perf_counter() - t0
    assert len(result.rows) == len(LRS) and all(r["status"] == "completed" for r in result.rows), result.rows
    return wall


def render(singles: list[float], sweeps: dict[int, float], load0: float, load1: float, started: datetime) -> str:
    one = statistics.median(singles)
    r1, r2 = sweeps[1] / (len(LRS) * one), sweeps[2] / (len(LRS) * one)
    per_trial = (sweeps[1] - len(LRS) * one) / len(LRS)
    if sweeps[2] < 0.95 * sweeps[1]:
        concurrency = (f"saves {100 * (1 - sweeps[2] / sweeps[1]):.0f} % of the serial sweep's time here: one trial's "
                       "start-up and evaluation overlap the other's training")
    else:
        concurrency = ("saves nothing here: the 2 cores are already busy with one trial's training worker, data "
                       "tasks and driver, so concurrency pays only where trials get cores (or nodes) of their own")
    return f"""## Tune overhead (issue 6)

Generated {started:%Y-%m-%d %H:%M} UTC by `.venv/bin/python bench/bench_tune.py` on {os.cpu_count()} CPU(s). Job: long-tailed
digits (exp, IF 10), `small_cnn` width 16, {EPOCHS} epochs, 1 Ray Train worker, local MLflow sqlite store. One trial alone
= `rwray.train.launch.run` (what each Tune trial's driver calls); sweep = `rwray tune` over a {len(LRS)}-value grid of
`optim.lr`, FIFO, parent + child MLflow runs, best.yaml. Ray started once before any timing; runs interleaved
(single, sweep, single, sweep, single). Load average (1 min) {load0:.1f} at the start, {load1:.1f} at the end.

| measurement | wall (s) |
|---|---:|
| one trial's job alone (median of {len(singles)}: {", ".join(f"{s:.1f}" for s in singles)}) | {one:.1f} |
| 4-trial sweep, 1 trial at a time | {sweeps[1]:.1f} |
| 4-trial sweep, 2 trials at a time | {sweeps[2]:.1f} |

| ratio | value |
|---|---:|
| Tune overhead: serial sweep / (4 x one trial) | **{r1:.2f}x** |
| concurrent sweep (2 at a time) / (4 x one trial) | {r2:.2f}x |

Reading: run one at a time, Tune adds about {per_trial:.0f} s per trial to a job of {one:.0f} s (the trial actor and its
driver start-up, every epoch's result streamed back through Tune, the sweep's parent run, summary and best.yaml);
for jobs of minutes or hours that is a small fixed cost, for these 3-epoch digits jobs it is {100 * (r1 - 1):.0f} %.
Running 2 trials at a time {concurrency}.
"""


def main() -> None:
    import ray

    from rwray.train.preflight import ensure_data, resolve_paths
    from rwray.train.rayenv import connect_ray

    load0 = os.getloadavg()
    started = datetime.now(timezone.utc)
    cfg = resolve_paths(job("bench-setup"))
    ensure_data(cfg)  # prepared once, outside every timing
    connect_ray(cfg, concurrent_runs=2)  # enough logical CPU for 2 concurrent trials and their data tasks
    singles, sweeps = [], {}
    singles.append(single(0))
    sweeps[1] = sweep(1)
    singles.append(single(1))
    sweeps[2] = sweep(2)
    singles.append(single(2))
    ray.shutdown()
    raw = {"singles": singles, "sweeps": sweeps, "load0": load0[0], "load1": os.getloadavg()[0],
           "started": started.isoformat()}
    (OUT / "results.json").write_text(json.dumps(raw, indent=1))
    write(raw)


def write(raw: dict) -> None:
    text = render(raw["singles"], {int(k): v for k, v in raw["sweeps"].items()}, raw["load0"], raw["load1"],
                  datetime.fromisoformat(raw["started"]))
    DOC.write_text(text)
    print(text)


if __name__ == "__main__":
    if sys.argv[1:] == ["--render-only"]:  # rewrite the doc from the last run's bench/out/tune/results.json
        write(json.loads((OUT / "results.json").read_text()))
    else:
        main()
