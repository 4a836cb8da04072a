"""`rwray report TABLE.yaml`: a reproduction's recorded runs read back as a markdown table of ours (mean +- std over
seeds, selected on validation) beside the paper's number, plus a plot; `replace_section` puts it into a document
(how docs/results.md is regenerated, table by table).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from rwray import plots
from rwray.errors import ConfigError
from rwray.metrics import best_key
from rwray.reproduce import Column, load_table


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
        raise ConfigError([f"no MLflow experiment {tj.table.name!r} in {uri}: run `rwray reproduce {path}` first"],
                            str(path))
    if parent_run_id is None:
        parents = c.search_runs([exp.experiment_id], f"tags.`rwray.table` = '{tj.table.name}'",
                                order_by=["attributes.start_time DESC"])
        parents = [p for p in parents if "mlflow.parentRunId" not in p.data.tags]
        if not parents:
            raise ConfigError([f"no reproduction of {tj.table.name!r} recorded in {uri}"], str(path))
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
        extra = "".join(f"{_mean_std(_values(runs, col), 1 if col.percent else 2)}{_paper(cfg, col)} | "
                        for col in cols)
        paper = f"{cfg.reference.value:.1f}" if cfg.reference else "-"
        lines.append(f"| {label} | {metric} | {_mean_std(vals)} | {extra}{len(vals)} | {paper} | "
                     f"{cfg.reference.source if cfg.reference else ''} |")
        plot_rows.append((label, statistics.mean(vals) if vals else math.nan,
                          cfg.reference.value if cfg.reference else math.nan))
    text = "\n".join(lines) + "\n"
    log = tracking.RunLogger(uri, parent_run_id)
    log.text(text, "report/table.md")
    log.artifact(_plot(plot_rows, tj.table.title, Path(out).with_suffix(".png") if out else None), "report")
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
    key = best_key(col.metric) if col.at == "best" else col.metric
    return [(100 if col.percent else 1) * r.data.metrics[key] for r in runs if key in r.data.metrics]


def _paper(cfg, col: Column) -> str:
    """' (paper X)' where the row's reference publishes this column's metric too (at the selected epoch)."""
    also = cfg.reference.also if cfg.reference else {}
    return f" (paper {also[col.metric]:.1f})" if col.at == "best" and col.metric in also else ""


def _mean_std(vals: list[float], digits: int = 1) -> str:
    if not vals:
        return "-"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 \
        else f"{vals[0]:.{digits}f}"


def _plot(rows: list[tuple[str, float, float]], title: str, path: Path | None) -> Path:
    import tempfile

    return plots.ours_vs_paper(rows, title, path or Path(tempfile.mkdtemp()) / "table.png")
