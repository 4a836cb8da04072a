"""Reproducing papers' tables: `rwray reproduce TABLE.yaml`.

A table file lists job files (one per paper-table row; each job carries the paper's number in `reference`) and the
seeds. `reproduce` runs rows x seeds as one Ray Tune grid (`rwray.trials`), so the runs spread over whatever cluster
Ray has; each is an ordinary `rwray train` run, a child of the table's MLflow run. `rwray.report` reads them back.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from rwray import config as C
from rwray import output, trials
from rwray.config import Config, Section
from rwray.errors import ConfigError


class Row(Section):
    job: Path  # relative to the table file
    label: str | None = None  # defaults to the job's name


class Column(Section):
    """One more metric the report shows for every row, beside the row's reference metric."""

    metric: str  # a metric the runs log, e.g. test_unbiased/top1 or pscore/spearman_vs_class_count
    label: str | None = None  # the column header; defaults to the metric
    at: Literal["best", "last"] = "best"  # at the epoch chosen on validation (best/<metric>), or the last logged value
    percent: bool = True  # a fraction shown in percent (accuracies); false: shown as logged (correlations)


class Table(Section):
    name: str  # also the MLflow experiment of its runs
    title: str
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    metric: str = "test/balanced_acc"  # the "ours" column of rows without a reference (a reference names its own)
    columns: list[Column] = []
    overrides: list[str] = []  # applied to every row (e.g. output_dir, scaling.num_workers)
    max_concurrent: int = Field(2, ge=1)
    rows: list[Row] = Field(min_length=1)


@dataclass
class TableJobs:
    table: Table
    jobs: list[tuple[str, Config]]  # (label, config) per row


def load_table(path: str | Path, overrides: list[str] = ()) -> TableJobs:
    """Validate the table and every row's job (with the table's and the command line's overrides), all at once."""
    path = Path(path)
    try:
        table = Table.model_validate(yaml.safe_load(path.read_text()))
    except FileNotFoundError:
        raise ConfigError([f"no such table file: {path}"], str(path)) from None
    except Exception as e:  # pydantic ValidationError or YAML error
        raise ConfigError([str(e)], str(path)) from None
    jobs, problems = [], []
    for row in table.rows:
        job_path = row.job if row.job.is_absolute() else path.parent / row.job
        try:
            cfg = C.load(job_path, [*table.overrides, *overrides, f"tracking.experiment={table.name}"])
            jobs.append((row.label or cfg.name, cfg))
        except ConfigError as e:
            problems += [f"{row.job}: {p}" for p in e.problems]
    labels = [label for label, _ in jobs]
    problems += [f"row label {x!r} is used twice" for x in {x for x in labels if labels.count(x) > 1}]
    if problems:
        raise ConfigError(problems, str(path))
    return TableJobs(table, jobs)


def _trial(sample: dict[str, Any], jobs: list[dict[str, Any]], labels: list[str], table: str, parent: str) -> None:
    i, seed = sample["row"], sample["seed"]
    raw = {**jobs[i], "train": {**jobs[i]["train"], "seed": seed},
           "tracking": {**jobs[i]["tracking"], "run_name": f"{labels[i]} seed {seed}"}}
    trials.run_trial(C.validate(raw, labels[i]), parent,
                     tags={"rwray.table": table, "rwray.row": labels[i], "rwray.seed": str(seed)})


def reproduce(path: str | Path, overrides: list[str] = ()) -> str:
    """Run every row x seed; returns the table's MLflow run id (the parent of every run)."""
    import ray.tune as tune

    from rwray.train.preflight import resolve_paths

    tj = load_table(path, list(overrides))
    jobs = [(label, resolve_paths(cfg)) for label, cfg in tj.jobs]
    _check_registry(jobs)
    parent_cfg = jobs[0][1].model_copy(update={"name": tj.table.name})
    tags = {"rwray.table": tj.table.name, "rwray.table_file": str(Path(path).resolve())}
    with trials.parent_run(parent_cfg, [cfg for _, cfg in jobs], tags) as parent:  # each data set prepared once
        trainable = partial(_trial, jobs=[cfg.model_dump(mode="json") for _, cfg in jobs],
                            labels=[label for label, _ in jobs], table=tj.table.name, parent=parent.run_id)
        grid = trials.fit(
            trainable,
            {"row": tune.grid_search(list(range(len(jobs)))), "seed": tune.grid_search(tj.table.seeds)},
            tune.TuneConfig(max_concurrent_trials=tj.table.max_concurrent), parent_cfg, parent, "reproduce",
            tj.table.max_concurrent)
        if grid.errors:
            output.say(f"{len(grid.errors)} of {len(jobs) * len(tj.table.seeds)} runs failed; the report shows the rest")
        _register_rows(parent, jobs)
        return parent.run_id


def _check_registry(jobs: list[tuple[str, Config]]) -> None:
    """Before any run: every registered-model name the rows ask for is one the registry accepts."""
    from rwray import tracking
    from rwray.tracking.model import check_registry

    for name, uri in {(cfg.tracking.register, tracking.resolve_uri(cfg)) for _, cfg in jobs if cfg.tracking.register}:
        check_registry(uri, name)


def _register_rows(parent: trials.Parent, jobs: list[tuple[str, Config]]) -> None:
    """With tracking.register (e.g. `rwray reproduce TABLE tracking.register=NAME`): per row, the seed chosen on
    validation (highest best/<train.select_metric>; never test) becomes a new version of NAME, tagged with its row,
    seed and score, and aliased by the row's label, so `models:/NAME@<row>` loads that row's model. Every trial
    already logged its selected model; this only registers. The versions are also listed in the table run's tag
    ``rwray.registered``."""
    from rwray import tracking
    from rwray.metrics import best_key
    from rwray.tracking import model as logged

    c = tracking.client(parent.uri)
    exp = c.get_run(parent.run_id).info.experiment_id
    children = c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.run_id}' and attributes.status = 'FINISHED'")
    registered = []
    for label, cfg in jobs:
        name = cfg.tracking.register
        if name is None:
            continue
        key = best_key(cfg.train.select_metric)
        runs = [r for r in children if r.data.tags.get("rwray.row") == label and key in r.data.metrics]
        chosen = max(runs, key=lambda r: r.data.metrics[key], default=None)
        model_uri = logged.logged_model(parent.uri, chosen.info.run_id) if chosen is not None else None
        if model_uri is None:
            output.say(f"{label}: no finished run with a logged model, so nothing is registered for it")
            continue
        seed, score = chosen.data.tags.get("rwray.seed", "?"), chosen.data.metrics[key]
        logged.ensure_registered(parent.uri, name, f"{label}'s model is logged as {model_uri}.")
        version = logged.add_version(parent.uri, name, model_uri, model_uri.removeprefix("models:/"),
                                     chosen.info.run_id, {"rwray.row": label, "rwray.seed": seed,
                                                          "rwray.select_metric": cfg.train.select_metric,
                                                          "rwray.select_value": repr(score),
                                                          "rwray.table_run_id": parent.run_id})
        alias = logged.alias_for(label)
        logged.set_alias(parent.uri, name, alias, version)
        registered.append(f"{name}/{version}")
        output.say(f"{label}: seed {seed} ({cfg.train.select_metric} {score:.4f}) registered as {name!r} version "
                   f"{version}, models:/{name}@{alias}")
    if registered:
        c.set_tag(parent.run_id, "rwray.registered", ",".join(registered))
