"""Sweeps: `rwray tune JOB.yaml` searches any dotted config path with Ray Tune.

Each trial is an ordinary run of the job with the sampled values applied (`rwray.trials`: a small driver fits its
own TorchTrainer, Tune's report callback forwards every epoch's metrics, so ASHA can stop trials). MLflow: one
parent run per sweep, one child run per trial (tag mlflow.parentRunId); at the end the best trial's config is
written as a runnable job YAML and a summary table is printed and logged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from rwray import trials
from rwray.config import Config, TuneConfig, apply_overrides, validate
from rwray.errors import ConfigError
from rwray.metrics import best_key, split_key


@dataclass
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    best_config_path: Path
    best: dict[str, Any]  # the best trial's sampled values and metric
    rows: list[dict[str, Any]]  # one per trial


def search_space(tc: TuneConfig) -> dict[str, Any]:
    """Dotted path -> Ray Tune distribution (flat keys: a trial's sample is a list of overrides)."""
    from ray import tune

    def one(d) -> Any:
        if d.kind == "grid" or (d.kind == "choice" and tc.search == "grid"):
            return tune.grid_search(list(getattr(d, d.kind)))
        if d.kind == "choice":
            return tune.choice(list(d.choice))
        if d.kind == "uniform":
            return tune.uniform(*d.uniform)
        if d.kind == "loguniform":
            return tune.loguniform(*d.loguniform)
        return tune.randint(*d.randint)

    return {path: one(d) for path, d in tc.space.items()}


def trial_config(base: dict[str, Any], sample: dict[str, Any], run_name: str | None = None) -> Config:
    """The job a trial runs: the sweep's job without its tune block, with the sampled values applied."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in sample.items()]
    if run_name:
        overrides.append(f"tracking.run_name={json.dumps(run_name)}")
    raw, problems = apply_overrides({k: v for k, v in base.items() if k != "tune"}, overrides)
    assert not problems, problems  # paths were validated with the sweep's config
    return validate(raw, "trial")


def _trial(sample: dict[str, Any], base: dict[str, Any], parent_run_id: str) -> None:
    """Runs inside a Tune trial actor: a driver for one TorchTrainer."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    trials.run_trial(trial_config(base, sample, run_name=f"{base.get('name', 'rwray')}-{trial_id}"), parent_run_id)


def _scheduler(cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = cfg.tune.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def _search_alg(cfg: Config):
    """The sampler, seeded by train.seed: the same job file samples the same trials."""
    if cfg.tune.search != "optuna":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=cfg.train.seed)  # random sampling / grid expansion
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=cfg.train.seed)


def sweep(cfg: Config) -> SweepResult:
    import ray.tune as tune

    from rwray import tracking
    from rwray.train.preflight import resolve_paths

    if cfg.tune is None:
        raise ConfigError(["this job has no tune: block (space, metric, num_samples, ...): see jobs/sweeps/"], cfg.name)
    if cfg.train.checkpoint_every_steps is not None:
        # A mid-epoch report would reach Tune as a result without the epoch's metrics (and count as an iteration).
        raise ConfigError(["train.checkpoint_every_steps: sweeps report once per epoch; leave it unset under "
                           "`rwray tune` (it is for long single runs)"], cfg.name)
    cfg = resolve_paths(cfg)
    tc = cfg.tune
    if cfg.tracking.register is not None:  # refused names fail before any trial
        from rwray.tracking.model import check_registry

        check_registry(tracking.resolve_uri(cfg), cfg.tracking.register)
    with trials.parent_run(cfg, [cfg], {"rwray.sweep": "true"}) as parent:
        base = cfg.model_dump(mode="json")
        # Ranking trials by `best/<metric>` (best epoch on validation so far, reported every epoch) picks the trial
        # whose best validation epoch is best; ASHA compares the per-epoch metric itself at its rungs.
        rank_key = best_key(tc.metric)
        grid = trials.fit(
            partial(_trial, base=base, parent_run_id=parent.run_id), search_space(tc),
            tune.TuneConfig(metric=tc.metric, mode=tc.mode, num_samples=tc.num_samples,
                            max_concurrent_trials=tc.max_concurrent, scheduler=_scheduler(cfg),
                            search_alg=_search_alg(cfg)),
            cfg, parent, "tune", tc.max_concurrent)
        rows, stopped = [], []
        for r in grid:
            m = r.metrics or {}
            epochs = int(m.get("training_iteration", 0))
            if r.error:
                status = f"error: {type(r.error).__name__}"
            elif epochs < cfg.train.epochs:
                status = f"stopped by {tc.scheduler.name} at epoch {epochs}"
                stopped.append((m.get("trial_id"), status))
            else:
                status = "completed"
            rows.append({"trial": m.get("trial_id", ""), **{k: r.config.get(k) for k in tc.space}, "epochs": epochs,
                         tc.metric: m.get(rank_key, math.nan),
                         "test/balanced_acc@best-val": m.get(best_key(split_key("test", "balanced_acc")), math.nan), "status": status})
        ok = [row for row in rows if not math.isnan(row[tc.metric])]
        if not ok:
            raise RuntimeError(f"no trial of the sweep reported {tc.metric}; see the trial errors: "
                               f"{[row['status'] for row in rows]}")
        best_row = (max if tc.mode == "max" else min)(ok, key=lambda row: row[tc.metric])
        best_sample = {k: best_row[k] for k in tc.space}
        best_cfg = trial_config(base, best_sample)
        # best.yaml and the summary are written locally (and logged to the sweep's MLflow run)
        local_root = Path(cfg.output_dir) if not cfg.remote_output else Path("rwray-sweeps")
        out_dir = local_root / "tune" / trials.tune_name(cfg, parent)  # beside Tune's own files
        out_dir.mkdir(parents=True, exist_ok=True)
        best_path = out_dir / "best.yaml"
        best_path.write_text(f"# best trial of sweep {parent.run_id} by {tc.metric} ({tc.mode}): {best_sample}\n"
                             + best_cfg.to_yaml())
        summary = _markdown(rows, list(tc.space), tc.metric)
        (out_dir / "summary.md").write_text(summary)
        log = tracking.RunLogger(parent.uri, parent.run_id)
        log.artifact(best_path)
        log.artifact(out_dir / "summary.md")
        log.metrics({rank_key: best_row[tc.metric], "trials": len(rows)}, step=0)
        completed = {row["trial"] for row in rows if row["status"] == "completed"}
        run_ids = _settle_children(cfg, parent.uri, parent.run_id, dict(stopped), completed)
        if cfg.tracking.log_model and best_row["trial"] in run_ids:
            registered = _register_best(cfg, parent, best_row, run_ids[best_row["trial"]])
            if registered is not None:
                tracking.client(parent.uri).set_tag(parent.run_id, "rwray.registered", registered)
        return SweepResult(parent.run_id, parent.uri, best_path, {**best_sample, tc.metric: best_row[tc.metric]},
                           rows)


def _register_best(cfg: Config, parent, best_row: dict[str, Any], run_id: str) -> str | None:
    """The best trial's selected weights as its MLflow model and, with tracking.register, a new version of that
    registered model (a trial's own run never gets to log one: Tune ends it at its last report). -> 'name/version'
    or None."""
    from rwray import tracking
    from rwray.data import Manifest
    from rwray.train.launch import publish_model

    trial_cfg = trial_config(cfg.model_dump(mode="json"), {k: best_row[k] for k in cfg.tune.space})
    model_uri, version = publish_model(trial_cfg, parent.uri, run_id, Manifest.load(cfg.data.dir),
                                       tracking.spool_dir(cfg, run_id), cfg.tracking.register)
    return f"{cfg.tracking.register}/{version}" if version is not None else None


def _settle_children(cfg: Config, uri: str, parent: str, stopped: dict[str, str], completed: set[str]
                     ) -> dict[str, str]:
    """Tune ends a trial at its last report, stopping its Train controller before the trial's driver has closed the
    MLflow run: the trial's buffered metrics and best checkpoint may still be in its spool, and the run is RUNNING
    or marked interrupted. Send what each trial left, then close its run: FINISHED when Tune completed it (every
    epoch reported) and nothing was left unsent, KILLED with the reason when the scheduler stopped it."""
    from rwray import tracking

    c = tracking.client(uri)
    run = c.get_run(parent)
    prefix, ids = f"{cfg.name}-", {}
    for child in c.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"):
        run_id = child.info.run_id
        trial_id = child.data.tags.get("mlflow.runName", "").removeprefix(prefix)
        ids[trial_id] = run_id
        left = tracking.replay(uri, run_id, tracking.spool_dir(cfg, run_id), timeout_s=60.0)
        if trial_id in completed and trial_id not in stopped and left == 0:
            if "rwray.error" in child.data.tags:  # the controller's stop after the last epoch is no failure
                c.delete_tag(run_id, "rwray.error")
            c.set_terminated(run_id, status="FINISHED")
        elif trial_id in stopped or child.info.status == "RUNNING":
            c.set_tag(run_id, "rwray.stopped_by", stopped.get(trial_id, "tune (trial ended)"))
            c.delete_tag(run_id, "rwray.error") if "rwray.error" in child.data.tags else None
            c.set_terminated(run_id, status="KILLED")
    return ids


def _markdown(rows: list[dict[str, Any]], params: list[str], metric: str) -> str:
    cols = ["trial", *params, "epochs", metric, "test/balanced_acc@best-val", "status"]
    ordered = sorted(rows, key=lambda r: -r[metric] if not math.isnan(r[metric]) else math.inf)

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in ordered]
    return "\n".join(lines) + "\n"


def load_best(path: Path) -> Config:
    return validate(yaml.safe_load(Path(path).read_text()), str(path))
