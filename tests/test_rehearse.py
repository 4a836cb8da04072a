"""`rwray rehearse` at scale 0.01 on the largest shape, iNaturalist 2018 (8,142 classes, every one present), end to
end on real Ray in subprocesses, as a user runs it (ImageNet-LT's 1,000 classes are rehearsed at full size by
bench/rehearsal.py, docs/rehearsal.md, and its list files train end to end in test_jobs_scale.py): synthetic data in
the real formats, prepare, verify, the jobs' own configs trained (model swapped), the selected model logged and
registered, evaluate and predict of the registered version. What grows with K stays bounded: no metric per class,
a per-class table per evaluation instead, sparse confusion counts, top-5 predictions."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from rwray.rehearse import Options, RehearsalFailed, load_jobs, rehearse
from rwray.rehearse_report import markdown

ROOT = Path(__file__).resolve().parent.parent
INAT = ROOT / "jobs/large/absgd_inat2018.yaml"
STAGES = ["synth", "prepare", "verify", "train", "evaluate", "predict"]

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal")
    lines: list[str] = []
    # The smallest model that takes images (the bench rehearses with ResNet-10): what is measured here is everything
    # around it at the real class counts, and the run's cost is the model's.
    model = {"name": "small_cnn", "width": 16, "norm": "group"}
    done = rehearse([INAT], Options(out=out, scale=0.01, size=16, epochs=1, model=model),
                    say=lines.append)
    return done, lines


def test_the_largest_job_rehearses_end_to_end_at_its_class_count(rehearsed):
    (r,) = rehearsed[0]
    k = 8142
    assert [s.name for s in r.stages] == STAGES
    assert r.num_classes == k and r.train_range[0] >= 1  # every class has a train image
    train = next(s for s in r.stages if s.name == "train")
    assert len(train.peaks["train worker"]) == 2 and len(train.peaks["decoding actor"]) == 2
    assert train.peaks["driver"][0] > 0 and "epochs" in train.note and "registered" in train.note

    c = MlflowClient(r.footprint["uri"])
    run = c.get_run(r.run_id)
    assert run.info.status == "FINISHED"
    per_class = re.compile(r"/class_acc/\d|class_samples/\d|weight/class_\d")
    assert not any(per_class.search(key) for key in run.data.metrics)  # K an epoch: 16,284 at iNaturalist
    assert run.data.metrics["best/test/top1"] >= 0
    assert r.footprint["rows"]["metrics"] < 200  # every metric of the 1 epoch, system metrics included
    artifacts = {a.path for d in ("evaluation", "per_class") for a in c.list_artifacts(r.run_id, d)}
    assert {"evaluation/per_class.parquet", "evaluation/confusion_pairs.parquet", "evaluation/confusion_matrix.png",
            "evaluation/per_class_accuracy.png", "per_class/epoch_000.parquet"} <= artifacts
    assert "evaluation/confusion_matrix.json" not in artifacts  # K x K as JSON only for small K
    local = Path(c.download_artifacts(r.run_id, "evaluation", str(Path(r.workdir) / "artifacts")))
    table = pq.read_table(local / "per_class.parquet")
    assert table.num_rows == k and sum(table.column("test_support").to_pylist()) == r.splits["test"]
    with Image.open(local / "confusion_matrix.png") as im:
        assert im.size[0] * im.size[1] < 2000 * 1500
    pairs = pq.read_table(local / "confusion_pairs.parquet")
    assert sum(pairs.column("count").to_pylist()) == r.splits["test"] and pairs.num_rows <= r.splits["test"]

    assert r.model_uri == f"models:/rehearsal-{r.name}/1"
    per_class = pq.read_table(Path(r.workdir) / "per_class_test.parquet")
    assert per_class.num_rows == k and sum(per_class.column("test_support").to_pylist()) == r.splits["test"]
    preds = pq.read_table(Path(r.workdir) / "predictions.parquet")
    assert preds.num_rows == r.splits["test"] and set(preds.column_names) == {"index", "label", "pred", "top_classes",
                                                                              "top_probs"}
    assert preds.schema.field("top_classes").type.list_size == 5


def test_the_report_names_every_stage_and_the_store(rehearsed):
    done, lines = rehearsed
    from dataclasses import asdict

    text = markdown("t", "intro", [asdict(r) for r in done])
    for r in done:
        assert f"### {r.name}" in text
    assert text.count("| train |") == 1 and "MLflow store:" in text and "train workers" in text
    assert any(line.startswith("  train: ") for line in lines)


def test_jobs_a_rehearsal_cannot_run_are_refused_all_at_once(tmp_path):
    from rwray.errors import ConfigError

    quick = ROOT / "rwray/recipes/quickstart.yaml"
    balms = ROOT / "jobs/paper/balanced_softmax/imagenet_lt_r10_balms.yaml"
    with pytest.raises(ConfigError) as e:
        load_jobs([quick, balms])
    msg = str(e.value)
    assert "data.source is digits" in msg and "a second stage (train.init_from) needs its first stage" in msg
    assert isinstance(RehearsalFailed("x"), Exception)
