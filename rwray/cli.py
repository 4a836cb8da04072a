"""`rwray` command line: data prepare, train, quickstart, validate, schema."""

from __future__ import annotations

import atexit
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Reweighted training on Ray, tracked in MLflow.")
data_app = typer.Typer(no_args_is_help=True, help="Build and check Parquet shard directories.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)


VERBOSE = typer.Option(False, "--verbose", "-v", help="show Ray's and MLflow's own logs on the terminal "
                       "(also RWRAY_VERBOSE=1); by default they go to the log file the start line names")


def _show(line: str) -> None:
    console.print(line, highlight=False, markup=False, soft_wrap=True)


@contextmanager
def terminal(verbose: bool) -> Iterator[None]:
    """rwray's own lines on the terminal, everybody else's in the run's log file (rwray.output); bad input as
    its message (friendly_errors)."""
    from rwray import output

    output.setup(verbose, show=_show)
    try:
        with friendly_errors():
            yield
    finally:
        output.teardown()


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Every rwray error becomes its message and its exit code (2: bad input, 1: the run failed), no traceback.
    Anything else is a bug and keeps its traceback."""
    from rwray.errors import RwrayError

    try:
        yield
    except RwrayError as e:
        console.print(f"[bold red]error:[/] {type(e).__name__}", highlight=False)
        console.print(str(e), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None


def _parse_pairs(pairs: list[str]) -> dict[str, object]:
    import yaml

    from rwray.errors import ConfigError

    out, problems = {}, []
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            problems.append(f"--param {p!r}: expected key=value")
        else:
            out[k] = yaml.safe_load(v) if v else ""
    if problems:
        raise ConfigError(problems, "command line")
    return out


def _progress(unit: str):
    """A rich progress display: a bar per task with its count, its rate in ``unit``/s and its ETA."""
    from rich import progress as rp
    from rich.text import Text

    class PerSecond(rp.ProgressColumn):
        def render(self, task) -> Text:
            # the task's average so far (rich's own speed needs two updates; a one-shard split has one)
            elapsed = task.finished_time or task.elapsed
            speed = f"{task.completed / elapsed:,.0f}" if elapsed and task.completed else "-"
            return Text(f"{speed} {unit}/s", style="progress.data.speed")

    return rp.Progress(rp.TextColumn("{task.description:<12}"), rp.BarColumn(), rp.MofNCompleteColumn(), PerSecond(),
                       rp.TimeElapsedColumn(), rp.TextColumn("ETA"), rp.TimeRemainingColumn(), console=console)


@data_app.command("prepare")
def data_prepare(
    source: str = typer.Argument(..., help="a data source: digits, cifar10, cifar100, synthetic, biased-mnist, "
                                 "image_folder, image_list, imagenet_lt, places_lt, inat2018, clothing1m, imagenet9, "
                                 "iwildcam (`rwray schema` lists their parameters)"),
    out: Path = typer.Option(..., "--out", help="shard directory to create"),
    imbalance: str = typer.Option("none", help="none | exp | step"),
    factor: float = typer.Option(1.0, help="imbalance factor n_max / n_min"),
    val_per_class: int = typer.Option(20, help="balanced validation samples per class, held out of training"),
    seed: int = typer.Option(0),
    label_noise: Optional[str] = typer.Option(None, help="symmetric | asymmetric"),
    noise_rate: float = typer.Option(0.0),
    rows_per_shard: int = typer.Option(10000),
    rows_per_group: int = typer.Option(256, help="image files: rows per Parquet row group (the streaming unit)"),
    resize: Optional[int] = typer.Option(None, help="image files: shrink the shorter side to this at prepare time"),
    workers: Optional[int] = typer.Option(None, help="image files: processes reading them (default: one per CPU)"),
    root: Optional[Path] = typer.Option(None, help="folder holding the source's files"),
    download: bool = typer.Option(False, help="download the source if missing (needs network)"),
    param: List[str] = typer.Option([], "--param", "-p", help="source parameter key=value, e.g. -p train_per_class=100"),
    overwrite: bool = typer.Option(False, help="replace an existing shard directory"),
) -> None:
    """Write train/val/test Parquet shards and a manifest from a source."""
    from rwray import config as C
    from rwray.data import prepare

    with friendly_errors():
        raw = {"name": source, **_parse_pairs(param)}
        if root is not None:
            raw["root"] = str(root)
        if download:
            raw["download"] = True
        params, builder = C.prepare_params(raw, dict(
            imbalance=imbalance, factor=factor, val_per_class=val_per_class, seed=seed, label_noise=label_noise,
            noise_rate=noise_rate, rows_per_shard=rows_per_shard, rows_per_group=rows_per_group, resize=resize,
            workers=workers), "rwray data prepare")
        with _progress("rows") as bar:
            # Reading (and downloading) the source and splitting it come before the first shard: no count yet.
            reading = bar.add_task(f"reading {source}", total=None)
            tasks: dict[str, int] = {}

            def shards_written(split: str, done: int, total: int) -> None:
                if split not in tasks:
                    if not tasks:
                        bar.remove_task(reading)
                    tasks[split] = bar.add_task(split, total=total)
                bar.update(tasks[split], completed=done)

            try:
                m = prepare(params, out, builder, overwrite=overwrite, progress=shards_written)
            except BaseException:
                if not tasks:  # refused before any shard (e.g. --out holds shards): the message alone
                    bar.remove_task(reading)
                raise
        counts = {s: m.num_samples(s) for s in ("train", "val", "test", *(e for e in m.eval_splits
                                                                          if e not in ("val", "test")))}
        per_class = m.class_counts("train")
        shown = per_class if len(per_class) <= 20 else f"{min(per_class)}..{max(per_class)} over {len(per_class)} classes"
        console.print(f"wrote {out}: {counts}; train per class {shown}")
        for note in m.data.get("notes", []):
            console.print(f"note: {note}")


@data_app.command("synth")
def data_synth(
    name: str = typer.Argument(..., help="imagenet_lt, places_lt, inat2018, clothing1m, iwildcam or imagenet9"),
    out: Path = typer.Option(..., "--out", help="folder to write the raw dataset into (its real on-disk format)"),
    scale: float = typer.Option(1.0, help="split sizes and per-class counts times this (every class keeps one)"),
    size: int = typer.Option(32, help="the shorter side of every image, pixels"),
    classes: Optional[int] = typer.Option(None, help="the same images per split, over this many classes"),
    seed: int = typer.Option(0),
    workers: Optional[int] = typer.Option(None, help="processes encoding images (default: one per CPU)"),
    overwrite: bool = typer.Option(False, help="replace what --out holds"),
) -> None:
    """Write a synthetic dataset with a large dataset's published shape in its exact on-disk format."""
    from rwray.data.synth import synthesize

    with friendly_errors():
        with _progress("files") as bar:
            planning = bar.add_task(f"planning {name}", total=None)  # lists and labels come before the first image
            task: list[int] = []

            def images_written(done: int, total: int) -> None:
                if not task:
                    bar.remove_task(planning)
                    task.append(bar.add_task("images", total=total))
                bar.update(task[0], completed=done)

            try:
                s = synthesize(name, out, scale=scale, size=size, classes=classes, seed=seed, workers=workers,
                               overwrite=overwrite, progress=images_written)
            except BaseException:
                if not task:  # refused before any image: the message alone
                    bar.remove_task(planning)
                raise
        counts = sorted(s.train_counts, reverse=True)
        console.print(f"wrote {s.out}: {s.files:,} images, {s.bytes / 2**20:,.1f} MiB in {s.seconds:,.1f} s "
                      f"({s.files / max(s.seconds, 1e-9):,.0f} files/s)", highlight=False)
        console.print(f"splits {s.splits}; {s.num_classes} classes; train per class {counts[0]}..{counts[-1]}",
                      highlight=False)
        for note in s.notes:
            console.print(f"note: {note}", highlight=False)
        console.print("read it with:", highlight=False)
        console.print(s.prepare_command(f"{s.out}-shards"), highlight=False, markup=False, soft_wrap=True)


@data_app.command("verify")
def data_verify(directory: Path) -> None:
    """Check a shard directory against its manifest (checksums, shapes, labels)."""
    from rwray.data import verify

    with friendly_errors():
        m = verify(directory)
        console.print(f"{directory}: ok ({sum(m.num_samples(s) for s in ('train', 'val', 'test'))} samples)")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(config: Path = typer.Argument(..., help="job YAML (see jobs/), or a bundled recipe: quickstart"),
          overrides: Optional[List[str]] = typer.Argument(None, help="dotted overrides, e.g. optim.lr=0.05"),
          verbose: bool = VERBOSE) -> None:
    """Train a job on Ray (RAY_ADDRESS or a local Ray) and record it in MLflow."""
    from rwray import config as C
    from rwray.train.launch import run

    with terminal(verbose):
        cfg = C.load(config, overrides or [])
        result = run(cfg)
        _summary(cfg.name, result)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def tune(config: Path = typer.Argument(..., help="job YAML with a tune: block (see jobs/sweeps/)"),
         overrides: Optional[List[str]] = typer.Argument(None, help="dotted overrides, e.g. tune.num_samples=8"),
         verbose: bool = VERBOSE) -> None:
    """Sweep a job's tune.space with Ray Tune (ASHA / random / grid / Optuna); each trial is a TorchTrainer."""
    from rwray import config as C
    from rwray.sweep import sweep

    with terminal(verbose):
        cfg = C.load(config, overrides or [])
        result = sweep(cfg)
        t = Table(title=f"{cfg.name}: {len(result.rows)} trials, ranked by {cfg.tune.metric} (best epoch on val)")
        cols = list(result.rows[0])
        for c in cols:
            t.add_column(c, justify="right")
        key = cfg.tune.metric
        for r in sorted(result.rows, key=lambda r: -(r[key] if r[key] == r[key] else -1)):
            t.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()))
        Console().print(t)
        console.print(f"best config: {result.best_config_path}  ({result.best})\nMLflow parent run "
                      f"{result.parent_run_id} in {result.tracking_uri}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def reproduce(table: Path = typer.Argument(..., help="table YAML (see jobs/tables/)"),
              overrides: Optional[List[str]] = typer.Argument(None, help="overrides applied to every row"),
              verbose: bool = VERBOSE) -> None:
    """Run a paper table's rows x seeds as one Ray Tune grid, then print the report."""
    from rwray.report import report
    from rwray.reproduce import reproduce as run_table

    with terminal(verbose):
        parent = run_table(table, overrides or [])
        sys.stdout.write(report(table, parent_run_id=parent))


@app.command("report", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def report_cmd(table: Path = typer.Argument(..., help="table YAML"),
               overrides: Optional[List[str]] = typer.Argument(None, help="the overrides `reproduce` was given"),
               out: Optional[Path] = typer.Option(None, help="also write the markdown (and a .png plot) here"),
               into: Optional[Path] = typer.Option(None, help="replace this table's section of a markdown file "
                                                   "(e.g. docs/results.md)"),
               run_id: Optional[str] = typer.Option(None, help="a reproduction's MLflow run (default: the latest)")) -> None:
    """Markdown table of a reproduction: ours (mean +- std over seeds) beside the paper's numbers."""
    from rwray.report import report

    with friendly_errors():
        sys.stdout.write(report(table, out, run_id, overrides or [], into))


QUICKSTART = ("quickstart", "quickstart_balanced_softmax")  # bundled recipes: ERM, then a reweighting method, same data


@app.command()
def quickstart(epochs: Optional[int] = typer.Option(None, help="override train.epochs"),
               workers: int = typer.Option(2, help="Ray Train workers"),
               verbose: bool = VERBOSE) -> None:
    """Long-tailed digits on 2 local CPU workers: ERM, then a reweighting method, side by side (local MLflow)."""
    from rwray import config as C
    from rwray.train.launch import run

    with terminal(verbose):
        overrides = [f"scaling.num_workers={workers}"] + ([f"train.epochs={epochs}"] if epochs else [])
        configs = [C.load(name, overrides) for name in QUICKSTART]  # validate both before running either
        results = [(cfg, run(cfg)) for cfg in configs]  # one Ray start serves both
        _comparison(results)
        db = results[-1][1].tracking_uri
        console.print(f"\nOpen the MLflow UI:  mlflow ui --backend-store-uri {db} --host 127.0.0.1 --port 5000"
                      f"\n                    then browse http://127.0.0.1:5000 (experiment "
                      f"{configs[0].tracking.experiment!r})", soft_wrap=True)


def _comparison(results) -> None:
    from rwray.metrics import SUMMARY_KEYS, best_key, split_key

    t = Table(title="long-tailed digits, test split at the epoch chosen on validation (%)")
    for col in ("job", "method", "top1", "balanced", "many", "medium", "few"):
        t.add_column(col, justify="right")
    for cfg, r in results:
        m = r.metrics
        keys = [best_key(split_key("test", k)) for k in SUMMARY_KEYS]
        t.add_row(cfg.name, cfg.method_label,
                  *(f"{100 * m[k]:.1f}" if k in m else "-" for k in keys))
    Console().print(t)


@app.command("validate")
def validate_jobs(files: List[Path]) -> None:
    """Validate job files; every problem of every file is listed."""
    from rwray import config as C

    failed = 0
    for f in files:
        try:
            C.load(f)
            console.print(f"ok    {f}")
        except C.ConfigError as e:
            failed += 1
            console.print(f"[red]FAIL[/]  {e}", highlight=False)
    raise typer.Exit(1 if failed else 0)


@app.command()
def schema() -> None:
    """Print the job schema (JSON Schema): every section, key, type, default and range."""
    from rwray.config import Config

    sys.stdout.write(json.dumps(Config.model_json_schema(), indent=2) + "\n")


SOURCE = typer.Argument(..., help="the model: a checkpoint folder, a run id, or a runs:/<run>/model or models:/... URI")
DATA = typer.Option(..., "--data", help="a shard directory with the model's classes (rwray data prepare)")
ON_RAY = typer.Option(None, "--ray/--no-ray", help="score with Ray Data actors (default: when the split's shards "
                      "exceed 1 GiB) or in this process")
TRACKING = typer.Option(None, "--tracking-uri", help="MLflow store of the source model and of the evaluation run "
                        "(default: $MLFLOW_TRACKING_URI, else ./runs/mlflow.db)")


def _inference_setup(source: str, data: Path, split: str, tracking_uri: Optional[str], ray: Optional[bool]):
    from rwray.data import Manifest
    from rwray.inference import check_data, load_source, on_ray
    from rwray.tracking import store_uri

    uri = store_uri(tracking_uri)  # an explicit --tracking-uri, else $MLFLOW_TRACKING_URI, else ./runs/mlflow.db
    model = load_source(source, uri)
    manifest = Manifest.load(data)
    check_data(model, manifest, split)
    ray = on_ray(manifest, split, ray)  # Ray starts only where it will score
    if ray:
        from rwray.train.rayenv import connect_ray

        connect_ray(None)
    return model, manifest, uri, ray


@app.command()
def evaluate(source: str = SOURCE, data: Path = DATA,
             split: str = typer.Option("test", "--split", help="the split to score (val, test, or an extra one)"),
             tracking_uri: Optional[str] = TRACKING, ray: Optional[bool] = ON_RAY,
             log: bool = typer.Option(True, "--log/--no-log", help="record the metrics as a new MLflow run"),
             per_class: Optional[Path] = typer.Option(None, "--per-class", help="also write the per-class table "
                                                      "(class, name, counts, accuracy) here: .parquet or .csv"),
             verbose: bool = VERBOSE) -> None:
    """Score a trained model on any shard directory with its classes: the metrics table, and a new MLflow run
    linked to the source (with the per-class table as an artifact)."""
    with terminal(verbose):
        from rwray import tables
        from rwray.inference import class_table, count, metrics_of, table_rows
        from rwray.tracking.evaluation import log_evaluation

        model, manifest, uri, ray = _inference_setup(source, data, split, tracking_uri, ray)
        counts = count(model, manifest, split, ray=ray)
        metrics = metrics_of(model, manifest, split, counts)
        console.print(f"{model.source} on {manifest.dir}, split {split} ({manifest.num_samples(split)} images)")
        t = Table()
        t.add_column("metric")
        t.add_column("%", justify="right")
        for name, value in table_rows(metrics, split, model.classes, counts.confusion):
            t.add_row(name, value)
        Console().print(t)
        columns = class_table(model, manifest, split, counts)
        if per_class is not None:
            tables.write_table(per_class, columns)
            console.print(f"per-class table ({len(model.classes)} classes): {per_class}")
        if log:
            run_id, where = log_evaluation(uri, model, manifest, split, metrics, columns)
            console.print(f"MLflow run {run_id} in {uri}; per-class table: {where}")


@app.command()
def predict(source: str = SOURCE, data: Path = DATA,
            out: Path = typer.Option(..., "--out", help="the Parquet file to write"),
            split: str = typer.Option("test", "--split", help="the split to score"),
            top: Optional[int] = typer.Option(None, "--top", min=1, help="keep the TOP most probable classes and "
                                              "their probabilities (top_classes, top_probs) instead of all K"),
            tracking_uri: Optional[str] = TRACKING, ray: Optional[bool] = ON_RAY, verbose: bool = VERBOSE) -> None:
    """Per-sample predictions of a trained model: index, label, predicted class and class probabilities."""
    with terminal(verbose):
        from rwray.inference import predict as write

        model, manifest, _, ray = _inference_setup(source, data, split, tracking_uri, ray)
        n = write(model, manifest, split, out, ray=ray, top=top)
        what = f"probs[{len(model.classes)}]" if top is None else f"top_classes[{top}], top_probs[{top}]"
        console.print(f"wrote {n} rows (index, label, pred, {what}) to {out}")


@app.command()
def rehearse(jobs: List[Path] = typer.Argument(..., help="job YAMLs on large datasets (jobs/paper, jobs/large); a "
                                               "second stage after its first"),
             scale: float = typer.Option(0.01, help="every split and class count times this (1: the real size)"),
             size: int = typer.Option(32, help="synthetic images' shorter side and the crop size, pixels"),
             classes: Optional[int] = typer.Option(None, help="the same images over this many classes"),
             epochs: int = typer.Option(1, min=1), workers: int = typer.Option(2, min=1, help="CPU train workers"),
             model: str = typer.Option("resnet10", help="the small model the jobs train instead of theirs "
                                       "(GroupNorm): resnet10 or small_cnn"),
             out: Path = typer.Option(Path("runs/rehearsal"), help="synthetic data, shards and each job's run"),
             report: Optional[Path] = typer.Option(None, help="also write the markdown tables here")) -> None:
    """Run large jobs end to end on this machine at their datasets' real shape (synthetic images in the real file
    formats): prepare, verify, train, model, registry, evaluate, predict; each stage's time and memory."""
    from rwray.rehearse import MODELS, Options, rehearse as run_all
    from rwray.rehearse_report import markdown

    with friendly_errors():
        if model not in MODELS:
            from rwray.errors import ConfigError

            raise ConfigError([f"--model {model!r}: choose {' or '.join(MODELS)}"], "rwray rehearse")
        opts = Options(out=out.absolute(), scale=scale, size=size, classes=classes, epochs=epochs, workers=workers,
                       model={"name": model, "norm": "group"})
        done = run_all(jobs, opts, say=_show)
        from dataclasses import asdict

        text = markdown(f"Rehearsal at scale {scale:g}", f"`rwray rehearse {' '.join(map(str, jobs))} --scale "
                        f"{scale:g} --size {size}" + (f" --classes {classes}" if classes else "")
                        + f" --epochs {epochs} --workers {workers}`", [asdict(r) for r in done])
        sys.stdout.write(text)
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(text)


def _summary(name: str, result) -> None:
    from rwray.metrics import BEST_EPOCH, SUMMARY_KEYS, best_key, split_key

    m = result.metrics
    t = Table(title=f"{name}: test metrics at the epoch chosen on validation (epoch {int(m.get(BEST_EPOCH, -1)) + 1})")
    for col in ("split", "top1", "balanced", "many", "medium", "few"):
        t.add_column(col, justify="right")

    def pct(key: str) -> str:
        return f"{100 * m[key]:.1f}" if key in m else "-"

    # test, and any extra test sets (e.g. test_unbiased), at the epoch chosen on val: best/<split>/top1 is logged
    selected = sorted({k.split("/")[1] for k in m if k.startswith(best_key("")) and k.endswith("/top1")})
    for split in selected:
        t.add_row(f"{split} (selected)", *(pct(best_key(split_key(split, k))) for k in SUMMARY_KEYS))
    t.add_row("val (last)", *(pct(split_key("val", k)) for k in SUMMARY_KEYS))
    Console().print(t)
    console.print(f"MLflow run {result.run_id} in {result.tracking_uri}")
    if result.model_uri is not None:  # the weights chosen on validation: mlflow.pyfunc.load_model(<this>)
        version = f" (registered version {result.model_version})" if result.model_version is not None else ""
        console.print(f"MLflow model {result.model_uri}{version}")


def main() -> None:
    """The `rwray` console script: the app, then a quick exit. Once a command has finished and the exit handlers
    have run (Ray's shutdown, MLflow's and logging's flushes), tearing down the interpreter's modules (torch, Ray,
    MLflow) only costs time: ~2 s on a laptop, on every command."""
    try:
        app()
        code = 0
    except SystemExit as e:  # typer ends every command this way
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None and e.code != "")
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()  # here, not in Ray's exit hook, which first waits 0.5 s for log lines (ours go to a file)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
