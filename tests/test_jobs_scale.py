"""The large-dataset jobs: paper rows on ImageNet-LT / Places-LT / 9-class ImageNet (jobs/paper/**), their tables
(jobs/tables/), and one CPU smoke job per image-file source (jobs/smoke/). Every file validates through the loader
`rwray train` / `rwray validate` use (`rwray.config.load`, `rwray.reproduce.load_table`); the smoke jobs are CPU,
one-epoch jobs on a prepared shard directory; every paper row carries its published number and its source; every
table lists jobs that exist. One real run: the imagenet_lt smoke job, end to end on a tiny fixture, on Ray.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rwray import config as C
from rwray.data.imagesources import FILE_SOURCES
from rwray.reproduce import load_table

ROOT = Path(__file__).parent.parent
JOBS = ROOT / "jobs"
SMOKE = JOBS / "smoke"

# The large-dataset paper tables and their digits-scale partners (the partners follow tests/test_tables.py's
# conventions: each paper row has a quick CPU sibling there).
SCALE_TABLES = [JOBS / "tables" / f"{t}.yaml" for t in ("balanced_softmax_large", "rebias_imagenet9")]
DIGITS_PARTNERS = [t.with_name(t.stem + "_digits.yaml") for t in SCALE_TABLES]
SOURCE_NAMES = [name for name, *_ in FILE_SOURCES]
SMOKE_JOBS = sorted(SMOKE.glob("*.yaml"))


def _rows(table: Path) -> list[Path]:
    if not table.is_file():
        return []  # reported by test_table_lists_existing_jobs_and_validates
    raw = yaml.safe_load(table.read_text())
    return [(table.parent / r["job"]).resolve() for r in raw["rows"]]


PAPER_JOBS = sorted({j for t in SCALE_TABLES for j in _rows(t)})
DIGITS_JOBS = sorted({j for t in DIGITS_PARTNERS for j in _rows(t)})


def _rel(paths):
    return [str(p.relative_to(JOBS)) for p in paths]


# ---------------------------------------------------------------------------------------------------- the tables


@pytest.mark.parametrize("table", SCALE_TABLES + DIGITS_PARTNERS, ids=lambda p: p.stem)
def test_table_lists_existing_jobs_and_validates(table):
    assert table.is_file(), f"{table} is missing"
    missing = [j for j in _rows(table) if not j.is_file()]
    assert not missing, f"{table.name} lists jobs that do not exist: {missing}"
    tj = load_table(table)  # every row validated with the table's overrides, every problem at once
    assert len(tj.jobs) == len(tj.table.rows) >= 2
    assert tj.table.seeds == [0, 1, 2]


# -------------------------------------------------------------------------------------------------- the paper rows


def test_every_new_paper_job_is_a_table_row():
    """Nothing matching the new paper jobs' names is left out of these tables (nor is a row anywhere else)."""
    paper, digits = JOBS / "paper", JOBS / "paper" / "digits"
    files = {p.resolve() for pattern in ("balanced_softmax/imagenet_lt_*.yaml", "balanced_softmax/places_lt_*.yaml",
                                         "rebias/imagenet9_*.yaml") for p in paper.glob(pattern)}
    files |= {p.resolve() for pattern in ("balanced_softmax/large_*.yaml", "rebias/imagenet9_*.yaml")
              for p in digits.glob(pattern)}
    assert files == set(PAPER_JOBS) | set(DIGITS_JOBS)
    assert all(digits not in p.parents for p in PAPER_JOBS) and all(digits in p.parents for p in DIGITS_JOBS)


@pytest.mark.parametrize("job", PAPER_JOBS, ids=_rel(PAPER_JOBS))
def test_paper_job_validates_with_a_sourced_reference_on_gpu_workers(job):
    cfg = C.load(job)
    ref = cfg.reference
    assert ref is not None, f"{job.name}: a paper row without its published number"
    assert 0 < ref.value <= 100 and len(ref.source) > 20
    assert "README" in ref.source or "Table" in ref.source, ref.source
    # the large-data setting: GPU workers, the streaming input, per-sample augmentation of JPEG shards
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == 8
    d = cfg.data
    assert d.source is not None and d.source.name in SOURCE_NAMES
    assert str(d.source.root).startswith("/data/"), "placeholder roots under /data/<dataset>"
    assert d.stream == "stream" and d.augment == "rrc_flip" and (d.crop_size, d.eval_resize) == (224, 256)
    assert d.decode_actors >= 1
    # one 8-GPU node: the workers and their decoding actors fit its CPUs (96 logical CPUs assumed)
    per_node = cfg.scaling.num_workers * (cfg.scaling.cpus_per_worker + d.decode_actors * d.decode_cpus)
    assert per_node <= 96, f"{job.name}: {per_node} CPUs for one 8-GPU node"
    text = job.read_text()
    assert text.startswith("# Paper row:")
    assert "Deviations:" in text, f"{job.name}: the header must say where the job departs from the paper"


@pytest.mark.parametrize("job", PAPER_JOBS, ids=_rel(PAPER_JOBS))
def test_pretrained_and_second_stage_jobs_name_their_weights(job):
    """A pretrained backbone comes from a local file (model.weights, a placeholder the header explains); a second
    stage starts from the first stage's checkpoint (train.init_from, a placeholder under output_dir)."""
    cfg, text = C.load(job), job.read_text()
    weights = getattr(cfg.model, "weights", None)
    if weights is not None:
        assert str(weights).startswith("/data/weights/") and "model.weights" in text
    if cfg.train.init_from is not None:
        assert cfg.train.trainable == "classifier" and "STAGE-1-RUN" in str(cfg.train.init_from)
        assert "train.init_from=" in text  # the header gives the command that fills the placeholder


# -------------------------------------------------------------------------------------------------- the smoke jobs


def test_every_image_source_has_a_smoke_job():
    assert sorted(p.stem for p in SMOKE_JOBS) == sorted(SOURCE_NAMES)


@pytest.mark.parametrize("job", SMOKE_JOBS, ids=lambda p: p.stem)
def test_smoke_job_is_one_cpu_epoch_on_a_prepared_dir(job):
    cfg = C.load(job)
    assert cfg.data.source is None, "a smoke job builds nothing: data.dir holds prepared shards"
    assert cfg.data.dir == Path("data/smoke") / job.stem
    assert not cfg.scaling.use_gpu and cfg.scaling.num_workers == 2 and cfg.scaling.cpus_per_worker == 0.5
    assert cfg.train.epochs == 1 and cfg.output_dir == "runs/smoke"
    d = cfg.data
    assert (d.decode_actors, d.decode_cpus, d.augment, d.stream) == (1, 0.25, "rrc_flip", "stream")
    assert (d.crop_size, d.eval_resize) == (32, 36)
    # a 2-core machine holds it: workers plus their decoding actors stay under 2 logical CPUs
    assert cfg.scaling.num_workers * (cfg.scaling.cpus_per_worker + d.decode_actors * d.decode_cpus) <= 2
    text = job.read_text()
    assert f"rwray data prepare {job.stem}" in text and f"--out data/smoke/{job.stem}" in text
    assert f"rwray train jobs/smoke/{job.stem}.yaml" in text


def test_noisy_and_biased_smoke_jobs_use_their_methods():
    clothing = C.load(SMOKE / "clothing1m.yaml")
    assert clothing.method.name == "absgd" and clothing.method.lam < 0
    # the 9-class ImageNet pair at smoke scale: f ResNet-10, g BagNet-18
    imagenet9 = C.load(SMOKE / "imagenet9.yaml")
    assert imagenet9.method.name == "rebias" and imagenet9.method.g.name == "bagnet18"
    paper = [C.load(j) for j in sorted((JOBS / "paper" / "rebias").glob("imagenet9_*.yaml"))]
    assert {c.model.name for c in paper} == {"resnet18_imagenet", "bagnet18"}  # f (and Biased: g alone)
    assert all(c.method.g.name == "bagnet18" for c in paper if hasattr(c.method, "g"))
    assert all(C.load(j).model.name == "resnet10" for j in SMOKE_JOBS)


# -------------------------------------------------------------------------------------------- one run, end to end


@pytest.mark.ray
def test_imagenet_lt_smoke_job_trains_end_to_end(tmp_path, ray_local):
    """The shipped smoke job, unchanged but for where it reads and writes: the OLTR fixture -> JPEG shards (row groups
    of 8) -> streaming decode on Ray Data actors -> 2 CPU workers -> MLflow. One epoch trains exactly the epoch
    plan's rows: the train split cut to a multiple of the 2 workers."""
    from image_fixtures import write_imagenet_lt
    from mlflow.tracking import MlflowClient

    from rwray.data import SOURCES, BuilderParams, Manifest, prepare
    from rwray.train import plan
    from rwray.train.launch import run

    fx = write_imagenet_lt(tmp_path / "raw")
    shards = tmp_path / "shards"
    prepare(SOURCES["imagenet_lt"].params(**fx["params"]), shards, BuilderParams(rows_per_group=8, workers=1))
    m = Manifest.load(shards)
    assert m.encoded and m.num_samples("train") == fx["counts"]["train"]

    cfg = C.load(SMOKE / "imagenet_lt.yaml", [f"data.dir={shards}", f"output_dir={tmp_path / 'runs'}"])
    res = run(cfg)

    client = MlflowClient(res.tracking_uri)
    assert client.get_run(res.run_id).info.status == "FINISHED"
    for key in ("train/loss", "val/top1", "val/balanced_acc", "test/top1", "test/balanced_acc"):
        hist = client.get_metric_history(res.run_id, key)
        assert [h.step for h in hist] == [0], key
        assert key == "train/loss" or 0 <= hist[0].value <= 1
    world = cfg.scaling.num_workers
    n_train = m.num_samples("train")
    assert n_train % world, "the fixture's train split should not divide evenly: the cut is part of the check"
    ranks = plan.epoch_plan(cfg.train.seed, 0, [rows for _, _, rows in m.row_groups("train")], world)
    assert sum(len(r) for r in ranks) == (n_train // world) * world
    assert res.metrics["train/samples"] == (n_train // world) * world


# ---------------------------------------------------------------------------------------- the large ABSGD recipes


LARGE_JOBS = sorted((JOBS / "large").glob("*.yaml"))


def test_large_absgd_recipes_stream_on_gpu_workers_without_a_reference():
    """jobs/large/: ABSGD recipes on iNaturalist 2018, Clothing1M (its README's ABCE, ABSCE and ABTCE commands) and
    iWildCam, for which upstream publishes no number (docs/references.md), so none carries a reference; all stream
    JPEG shards with per-sample rrc_flip on GPU workers, and Clothing1M is the noisy-label variant (lambda < 0).
    Where the seed's BatchNorm saw 128 images on one GPU and a worker holds 16, BatchNorm is global (sync_bn)."""
    assert sorted(p.stem for p in LARGE_JOBS) == ["absgd_clothing1m", "absgd_clothing1m_absce", "absgd_clothing1m_abtce",
                                                  "absgd_inat2018", "absgd_iwildcam"]
    cfgs = {p.stem: C.load(p) for p in LARGE_JOBS}
    for stem, cfg in cfgs.items():
        assert cfg.reference is None, f"{stem}: no verified published number, so no reference"
        assert cfg.method.name == "absgd", stem
        assert cfg.scaling.use_gpu, stem
        d = cfg.data
        assert d.stream == "stream" and d.augment == "rrc_flip", stem
        assert d.source is not None and d.source.name in SOURCE_NAMES, stem
    for stem in ("absgd_clothing1m", "absgd_clothing1m_absce", "absgd_clothing1m_abtce"):
        clothing = cfgs[stem]
        assert clothing.method.lam < 0 and clothing.data.source.train == "noisy", stem
    assert {c.method.loss.name for s, c in cfgs.items() if "clothing" in s} == {"ce", "sce", "lq"}
    for stem, cfg in cfgs.items():
        one_gpu_bn = cfg.data.batch_size * cfg.scaling.num_workers if stem != "absgd_iwildcam" else 16
        assert cfg.model.sync_bn == (one_gpu_bn > cfg.data.batch_size), stem
