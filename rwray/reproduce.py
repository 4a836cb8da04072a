"""Reproducing papers' tables: `rwray reproduce TABLE.yaml` and `rwray report TABLE.yaml`.

A table file lists job files (one per paper-table row; each job carries the paper's number in `reference`) and the
seeds. `reproduce` runs rows x seeds as one Ray Tune grid, so the runs spread over whatever cluster Ray has; each is
an ordinary `rwray train` run, a child of the table's MLflow run. `report` reads those runs back and writes a markdown
table of ours (mean +- std over seeds, selected on validation) beside the paper's number, plus a plot.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from rwray import config as C
from rwray.config import Config, Section


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
        raise C.ConfigError([f"no such table file: {path}"], str(path)) from None
    except Exception as e:  # pydantic ValidationError or YAML error
        raise C.ConfigError([str(e)], str(path)) from None
    jobs, problems = [], []
    for row in table.rows:
        job_path = row.job if row.job.is_absolute() else path.parent / row.job
        try:
            cfg = C.load(job_path, [*table.overrides, *overrides, f"tracking.experiment={table.name}"])
            jobs.append((row.label or cfg.name, cfg))
        except C.ConfigError as e:
            problems += [f"{row.job}: {p}" for p in e.problems]
    labels = [label for label, _ in jobs]
    problems += [f"row label {x!r} is used twice" for x in {x for x in labels if labels.count(x) > 1}]
    if problems:
        raise C.ConfigError(problems, str(path))
    return TableJobs(table, jobs)


def _trial(sample: dict[str, Any], jobs: list[dict[str, Any]], labels: list[str], table: str, parent: str) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from rwray.train.launch import run

    i, seed = sample["row"], sample["seed"]
    raw = {**jobs[i], "train": {**jobs[i]["train"], "seed": seed},
           "tracking": {**jobs[i]["tracking"], "run_name": f"{labels[i]} seed {seed}"}}
    run(C.validate(raw, labels[i]), parent_run_id=parent, callbacks=[TuneReportCallback()],
        tags={"rwray.table": table, "rwray.row": labels[i], "rwray.seed": str(seed)})


def reproduce(path: str | Path, overrides: list[str] = ()) -> str:
    """Run every row x seed; returns the table's MLflow run id (the parent of every run)."""
    import ray.tune as tune

    from rwray import tracking
    from rwray.train.launch import connect_ray, ensure_data, resolve_paths

    tj = load_table(path, list(overrides))
    jobs = [(label, resolve_paths(cfg)) for label, cfg in tj.jobs]
    first = jobs[0][1]
    uri = tracking.resolve_uri(first)
    tracking.preflight(uri)
    shas = {str(cfg.data.dir): ensure_data(cfg).sha256 for _, cfg in jobs}  # prepare each data set once, up front
    parent_cfg = first.model_copy(update={"name": tj.table.name})
    parent = tracking.start_run(parent_cfg, uri, ",".join(sorted(set(shas.values())))[:5000],
                                {"rwray.table": tj.table.name, "rwray.table_file": str(Path(path).resolve())})
    error: BaseException | None = None
    try:
        connect_ray(first, concurrent_runs=tj.table.max_concurrent)
        trainable = partial(_trial, jobs=[cfg.model_dump(mode="json") for _, cfg in jobs],
                            labels=[label for label, _ in jobs], table=tj.table.name, parent=parent)
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"CPU": 0.01}),
            param_space={"row": tune.grid_search(list(range(len(jobs)))), "seed": tune.grid_search(tj.table.seeds)},
            tune_config=tune.TuneConfig(max_concurrent_trials=tj.table.max_concurrent),
            run_config=tune.RunConfig(name=f"{tj.table.name}-{parent[:8]}", storage_path=first.storage("reproduce"),
                                      verbose=1))
        grid = tuner.fit()
        if grid.errors:
            print(f"{len(grid.errors)} of {len(jobs) * len(tj.table.seeds)} runs failed; the report shows the rest")
        return parent
    except BaseException as e:
        error = e
        raise
    finally:
        tracking.finish(uri, parent, error)


def report(path: str | Path, out: Path | None = None, parent_run_id: str | None = None,
           overrides: list[str] = (), into: Path | None = None) -> str:
    """Markdown table (ours beside the paper's) from the recorded runs of the table's latest (or given) reproduction.
    `overrides` are those the reproduction ran with (they locate its tracking store); `into` is a markdown document
    whose section for this table is replaced."""
    from rwray import tracking

    tj = load_table(path, list(overrides))
    uri = tracking.resolve_uri(tj.jobs[0][1])
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(tj.table.name)
    if exp is None:
        raise C.ConfigError([f"no MLflow experiment {tj.table.name!r} in {uri}: run `rwray reproduce {path}` first"],
                            str(path))
    if parent_run_id is None:
        parents = c.search_runs([exp.experiment_id], f"tags.`rwray.table` = '{tj.table.name}'",
                                order_by=["attributes.start_time DESC"])
        parents = [p for p in parents if "mlflow.parentRunId" not in p.data.tags]
        if not parents:
            raise C.ConfigError([f"no reproduction of {tj.table.name!r} recorded in {uri}"], str(path))
        parent_run_id = parents[0].info.run_id
    children = [r for r in c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
                if r.info.status == "FINISHED"]
    cols = tj.table.columns
    lines = [f"### {tj.table.title}", "",
             "Ours: mean ± std over seeds of the test metric at the epoch chosen on validation. "
             f"Reproduction run `{parent_run_id}`.", "",
             "| row | metric | ours | " + "".join(f"{col.label or col.metric} | " for col in cols)
             + "seeds | paper | source |", "|---|---|---|" + "---|" * len(cols) + "---|---|---|"]
    plot_rows = []
    for label, cfg in tj.jobs:
        runs = [r for r in children if r.data.tags.get("rwray.row") == label]
        metric = cfg.reference.metric if cfg.reference else tj.table.metric
        vals = _values(runs, Column(metric=metric))
        extra = "".join(f"{_mean_std(_values(runs, col), 1 if col.percent else 2)} | " for col in cols)
        paper = f"{cfg.reference.value:.1f}" if cfg.reference else "-"
        lines.append(f"| {label} | {metric} | {_mean_std(vals)} | {extra}{len(vals)} | {paper} | "
                     f"{cfg.reference.source if cfg.reference else ''} |")
        plot_rows.append((label, statistics.mean(vals) if vals else math.nan,
                          cfg.reference.value if cfg.reference else math.nan))
    text = "\n".join(lines) + "\n"
    log = tracking.RunLogger(uri, parent_run_id)
    log.text(text, "report/table.md")
    png = _plot(plot_rows, tj.table.title, Path(out).with_suffix(".png") if out else None)
    if png is not None:
        log.artifact(png, "report")
    if out is not None:
        Path(out).write_text(text)
    if into is not None:
        replace_section(Path(into), tj.table.name, text)
    return text


def replace_section(doc: Path, key: str, text: str) -> None:
    """Put `text` between the document's <!-- report:KEY:begin/end --> markers (appended, with markers, if absent),
    leaving everything else as it is: how docs/results.md is regenerated table by table."""
    begin, end = f"<!-- report:{key}:begin -->", f"<!-- report:{key}:end -->"
    old = doc.read_text() if doc.is_file() else ""
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    doc.write_text(new)


def _values(runs: list, col: Column) -> list[float]:
    """One value per run that logged the column's metric (best/<metric> or the last value), in percent if asked."""
    key = f"best/{col.metric}" if col.at == "best" else col.metric
    return [(100 if col.percent else 1) * r.data.metrics[key] for r in runs if key in r.data.metrics]


def _mean_std(vals: list[float], digits: int = 1) -> str:
    if not vals:
        return "-"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 \
        else f"{vals[0]:.{digits}f}"


def _plot(rows: list[tuple[str, float, float]], title: str, path: Path | None) -> Path:
    import tempfile

    from rwray import plots

    return plots.ours_vs_paper(rows, title, path or Path(tempfile.mkdtemp()) / "table.png")
