"""`rwray rehearse`: a large job run end to end on this machine at its dataset's real shape, before a cluster is paid
for.

Each job's dataset is written synthetically in its real on-disk format (`rwray.data.synth`: the real class count,
the published long tail, the real split sizes times ``scale``), then every command a cluster run goes through runs
as its own process, as a user would type it:

    synth -> rwray data prepare -> rwray data verify -> rwray train (the job itself; only the model swapped for a
    small one, the images' size, the epochs and the workers this machine has; mid-epoch checkpoints on; the selected
    model logged and registered) -> rwray evaluate -> rwray predict

and each stage is timed and its processes' peak memory read (`rwray.memwatch`: the driver, each train worker, each
decoding actor, Ray's own processes). What the run left in MLflow is measured after it (`rwray.tracking.footprint`).
Whatever grows with classes, images or epochs shows up here, on a laptop, rather than after days on a cluster.

Jobs that share a dataset share its files; a second-stage job (``train.init_from``) starts from the checkpoint of
the last job before it on the same dataset, so list a first stage before its second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from rwray import config as C
from rwray.errors import ConfigError, RehearsalFailed
from rwray.memwatch import PeakWatch
from rwray.metrics import CLASS_METRICS_MAX

PATH_PARAMS = ("root", "image_root", "imagenet_a_root", "clusters_csv")  # source params that name files
EVAL_RESIZE = 256 / 224  # the jobs' eval resize over crop ratio (Resize(256) + CenterCrop(224))
TOP = 5  # `rwray predict --top` above CLASS_METRICS_MAX classes (the full probabilities are 4K bytes a row)


MODELS = ("resnet10", "small_cnn")  # the small models a rehearsal may swap in (GroupNorm: no batch statistics)


@dataclass
class Options:
    out: Path  # the rehearsal's folder: raw/ (synthetic datasets), shards/, and one folder per job
    scale: float = 0.01  # every split size and per-class count times this (every class keeps a train image)
    size: int = 32  # images' shorter side, pixels; crops are this size
    classes: int | None = None  # the same images over this many classes (None: the dataset's own count)
    epochs: int = 1
    workers: int = 2  # Ray Train workers (CPU)
    seed: int = 0
    model: dict = field(default_factory=lambda: {"name": "resnet10", "norm": "group"})


@dataclass
class Stage:
    name: str
    seconds: float
    peaks: dict[str, list[int]] = field(default_factory=dict)  # process kind -> peak RSS of each, bytes
    note: str = ""


@dataclass
class Rehearsal:
    job: str  # the job file as given
    name: str  # its name:
    dataset: str  # source name
    num_classes: int = 0
    splits: dict[str, int] = field(default_factory=dict)  # images per split of the shard directory
    train_range: tuple[int, int] = (0, 0)  # the train split's smallest and largest class
    stages: list[Stage] = field(default_factory=list)
    footprint: dict[str, Any] = field(default_factory=dict)  # `rwray.tracking.footprint.Footprint` as a dict
    run_id: str | None = None
    model_uri: str | None = None
    workdir: str = ""


Say = Callable[[str], None]


def load_jobs(jobs: list[Path]) -> list[tuple[Path, C.Config]]:
    """Every job validated, and rehearsable: a source `rwray data synth` writes, a first stage before a second.
    All problems at once."""
    from rwray.data.synth import SYNTHS

    out, problems, seen = [], [], set()
    for job in jobs:
        try:
            cfg = C.load(job)
        except ConfigError as e:
            problems += [f"{job}: {p}" for p in e.problems]
            continue
        src = cfg.data.source
        if src is None or src.name not in SYNTHS:
            problems.append(f"{job}: data.source is {src.name if src else 'not set'}; a rehearsal writes synthetic "
                            f"copies of {', '.join(sorted(SYNTHS))}")
        elif cfg.train.init_from is not None and src.name not in seen:
            problems.append(f"{job}: a second stage (train.init_from) needs its first stage on {src.name} listed "
                            f"before it")
        else:
            seen.add(src.name)
        out.append((job, cfg))
    if problems:
        raise ConfigError(problems, "rwray rehearse")
    return out


def rehearse(jobs: list[Path], opts: Options, say: Say = print) -> list[Rehearsal]:
    """Rehearse each job in turn (see the module's docstring). Raises `RehearsalFailed` at the first stage that
    fails, naming its log."""
    loaded = load_jobs(jobs)
    opts.out.mkdir(parents=True, exist_ok=True)
    done: list[Rehearsal] = []
    last_checkpoint: dict[str, str] = {}  # dataset -> the latest checkpoint of the last job on it
    prepared: dict[str, str] = {}  # shard folder -> the job that prepared it
    for job, cfg in loaded:
        r = Rehearsal(str(job), cfg.name, cfg.data.source.name, workdir=str(opts.out / "jobs" / cfg.name))
        Path(r.workdir).mkdir(parents=True, exist_ok=True)
        say(f"rehearsal of {cfg.name} ({job}): {cfg.data.source.name} at scale {opts.scale:g}")
        source, shards = dataset(cfg, opts, r, prepared, say)
        runs = opts.out / "runs" / shards.name  # shared by the jobs on one dataset: a second stage starts inside it
        if r.dataset not in last_checkpoint and runs.exists():  # an earlier rehearsal's runs: start afresh
            shutil.rmtree(runs)
        job_file = write_job(cfg, opts, source, shards, r.splits["train"], Path(r.workdir), runs,
                             last_checkpoint.get(r.dataset))
        train(job_file, r, say)
        last_checkpoint[r.dataset] = latest_checkpoint(runs, cfg.tracking.run_name or cfg.name)
        score(r, shards, say)
        done.append(r)
        (Path(r.workdir) / "rehearsal.json").write_text(json.dumps(asdict(r), indent=1))
    return done


# ------------------------------------------------------------------------------------------------------ the data


def dataset(cfg: C.Config, opts: Options, r: Rehearsal, prepared: dict[str, str], say: Say) -> tuple[dict, Path]:
    """The job's dataset written synthetically (once per dataset and shape) and prepared into shards (once per
    dataset, source parameters and builder): -> (the data.source block that reads it, the shard folder)."""
    from rwray.data import Manifest
    from rwray.data.synth import synthesize

    src = cfg.data.source.model_dump(mode="json")
    shape = f"{src['name']}-s{opts.scale:g}-px{opts.size}" + (f"-k{opts.classes}" if opts.classes else "")
    raw = opts.out / "raw" / shape
    if not raw.is_dir():
        t0 = time.perf_counter()
        with PeakWatch(os.getpid()) as watch:  # the writer's process pool; this process itself is left out
            made = synthesize(src["name"], raw, scale=opts.scale, size=opts.size, classes=opts.classes,
                              seed=opts.seed)
        peaks = {k: v for k, v in watch.peaks().items() if k != "driver"}
        r.stages.append(Stage("synth", time.perf_counter() - t0, peaks, f"{made.files:,} images, "
                              f"{made.bytes / 2**20:,.0f} MiB"))
        (raw.parent / f"{shape}.json").write_text(json.dumps(made.source))
        say(f"  synth: {made.files:,} images in {r.stages[-1].seconds:.0f} s")
    synthetic = json.loads((raw.parent / f"{shape}.json").read_text())
    source = {**{k: v for k, v in src.items() if k not in PATH_PARAMS and v is not None}, **synthetic}
    key = hashlib.sha256(json.dumps([source, cfg.data.builder.model_dump(mode="json")], sort_keys=True).encode())
    shards = opts.out / "shards" / f"{shape}-{key.hexdigest()[:8]}"
    if not (shards / "manifest.json").is_file():
        argv = ["data", "prepare", source["name"], "--out", str(shards), "--root", str(source["root"]),
                "--seed", str(cfg.data.builder.seed), "--rows-per-group", str(cfg.data.builder.rows_per_group)]
        argv += [w for k, v in source.items() if k not in ("name", "root") for w in ("-p", f"{k}={v}")]
        r.stages.append(command("prepare", argv, Path(r.workdir) / "prepare.log", say))
        r.stages.append(command("verify", ["data", "verify", str(shards)], Path(r.workdir) / "verify.log", say))
        prepared[str(shards)] = cfg.name
    else:
        shared = prepared.get(str(shards), "an earlier rehearsal")
        r.stages.append(Stage("prepare + verify", 0.0, note=f"the shards of {shared}"))
    m = Manifest.load(shards)
    r.num_classes = m.num_classes
    r.splits = {s: m.num_samples(s) for s in ("train", *m.eval_splits)}
    counts = m.class_counts("train")
    r.train_range = (min(counts), max(counts))
    return source, shards


# ------------------------------------------------------------------------------------------------------- the job


def write_job(cfg: C.Config, opts: Options, source: dict, shards: Path, train_size: int, workdir: Path, runs: Path,
              init_from: str | None) -> Path:
    """The job as it runs here: its own config, with the model swapped for ``opts.model`` (GroupNorm: a rank's
    last batch may hold one image), crops of the synthetic images' size, ``opts.epochs`` epochs, ``opts.workers``
    CPU workers with one decoding actor each sharing the job's global batch (so an epoch has the job's number of
    steps), a mid-epoch checkpoint half way through every epoch, no local weights files, its output in ``runs``,
    and the selected model logged and registered. -> the job file written into ``workdir``."""
    raw = yaml.safe_load(cfg.to_yaml())
    data = raw["data"]
    data.update({"dir": str(shards), "source": source, "crop_size": opts.size,
                 "eval_resize": round(opts.size * EVAL_RESIZE),
                 "batch_size": max(1, data["batch_size"] * cfg.scaling.num_workers // opts.workers)})
    if data.get("stream") == "stream":
        data.update({"decode_actors": 1, "decode_cpus": 0.25, "decode_window": 2, "decode_node_labels": None})
    keep = {k: raw["model"][k] for k in ("normed_head", "dropout") if k in raw["model"]}
    raw["model"] = {**opts.model, **keep}
    g = raw["method"].get("g")
    if isinstance(g, dict) and g.get("weights"):
        g["weights"] = None
    steps = max(1, train_size // (data["batch_size"] * opts.workers))
    train = raw["train"]
    train.update({"epochs": opts.epochs, "amp": "none", "compile": False,
                  "checkpoint_every_steps": max(1, steps // 2) if steps > 1 else None})
    if train.get("init_from") is not None:
        train["init_from"] = init_from
    raw["scaling"] = {**raw["scaling"], "num_workers": opts.workers, "use_gpu": False, "cpus_per_worker": 0.5,
                      "memory_per_worker_gb": None}
    raw["output_dir"] = str(runs)
    raw["tracking"] = {**raw["tracking"], "uri": None, "log_model": True, "register": f"rehearsal-{cfg.name}",
                       "experiment": "rehearsal"}
    path = workdir / "job.yaml"
    path.write_text(C.validate(raw).to_yaml())
    return path


def train(job_file: Path, r: Rehearsal, say: Say) -> None:
    """`rwray train` on the job, timed in the parts the tracking store dates (startup, epochs, final artifacts,
    model logged, registered, closed)."""
    from rwray import tracking
    from rwray.tracking.footprint import run_footprint

    start = time.time()
    stage = command("train", ["train", str(job_file)], Path(r.workdir) / "train.log", say)
    end = time.time()
    cfg = C.load(job_file)
    uri = tracking.resolve_uri(cfg)
    run = latest_run(uri, cfg.tracking.run_name or cfg.name)
    r.run_id = run.info.run_id
    fp = run_footprint(uri, r.run_id)
    r.footprint = {**asdict(fp), "uri": uri}
    marks = [("startup", fp.times.get("start")), ("epochs", fp.times.get("epochs")),
             ("final artifacts", fp.times.get("artifacts")), ("model logged", fp.times.get("model")),
             ("registered", fp.times.get("registered")), ("closed", int(end * 1000))]
    last, parts = int(start * 1000), []
    for name, at in marks:
        if at is not None and at >= last:
            parts.append(f"{name} {(at - last) / 1000:.1f}s")
            last = at
    stage.note = ", ".join(parts)
    r.stages.append(stage)
    versions = tracking.client(uri).search_model_versions(f"run_id = '{r.run_id}'")
    if versions:
        v = max(versions, key=lambda v: int(v.version))
        r.model_uri = f"models:/{v.name}/{v.version}"


def score(r: Rehearsal, shards: Path, say: Say) -> None:
    """`rwray evaluate` and `rwray predict` of the registered version on the test split."""
    if r.model_uri is None:
        raise RehearsalFailed(f"{r.name}: the run registered no model version; see {r.workdir}/train.log")
    uri = r.footprint["uri"]
    common = ["--data", str(shards), "--split", "test", "--tracking-uri", uri]
    r.stages.append(command("evaluate", ["evaluate", r.model_uri, *common, "--per-class",
                                         str(Path(r.workdir) / "per_class_test.parquet")],
                            Path(r.workdir) / "evaluate.log", say))
    top = ["--top", str(TOP)] if r.num_classes > CLASS_METRICS_MAX else []
    r.stages.append(command("predict", ["predict", r.model_uri, *common, "--out",
                                        str(Path(r.workdir) / "predictions.parquet"), *top],
                            Path(r.workdir) / "predict.log", say))


# ----------------------------------------------------------------------------------------------------- processes


def command(name: str, argv: list[str], log: Path, say: Say) -> Stage:
    """``rwray <argv>`` as its own process on a local Ray (no RAY_ADDRESS: its processes must be its children to be
    measured), output to ``log``; -> its wall time and peak memory by kind of process."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RWRAY_VERBOSE")}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "rwray.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        with PeakWatch(proc.pid) as watch:
            code = proc.wait()
    seconds = time.perf_counter() - t0
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RehearsalFailed(f"`rwray {' '.join(argv)}` exited with {code} after {seconds:.0f} s; its log is "
                              f"{log}; it ends:\n{tail}")
    say(f"  {name}: {seconds:.0f} s")
    return Stage(name, seconds, watch.peaks())


def latest_run(uri: str, name: str):
    """The newest run named ``name`` in the rehearsal experiment."""
    from rwray import tracking

    c = tracking.client(uri)
    exp = c.get_experiment_by_name("rehearsal")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.runName` = '{name}'",
                         order_by=["attributes.start_time DESC"], max_results=1) if exp else []
    if not runs:
        raise RehearsalFailed(f"no run named {name!r} in {uri}")
    return runs[0]


def latest_checkpoint(runs: Path, name: str) -> str:
    """The latest checkpoint Ray Train recorded for job ``name`` under the output folder ``runs``."""
    from rwray.train import checkpoint

    folders = sorted((runs / "ray").glob(f"{name}-*"), key=lambda p: p.stat().st_mtime)
    found = [c for d in reversed(folders) if (c := checkpoint.latest_in(d)) is not None]
    if not found:
        raise RehearsalFailed(f"no checkpoint of {name} under {runs / 'ray'}")
    return str(found[0])
