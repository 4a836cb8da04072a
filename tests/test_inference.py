"""`rwray evaluate` and `rwray predict` on a real trained run: the numbers are the run's own (same weights, same
images, same metric code), in this process and on Ray Data alike; bad sources and data are refused with a reason."""

from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import job
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from rwray import cli
from rwray.data import Manifest
from rwray.errors import DataError, SourceError
from rwray.inference import Model, check_data, evaluate, load_source, predict

pytestmark = pytest.mark.ray
KEYS = ("top1", "balanced_acc", "many_acc", "medium_acc", "few_acc", "macro_f1", "worst_class_acc")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_dir, ray_local):
    from rwray.train.launch import run

    tmp = tmp_path_factory.mktemp("inference")
    res = run(job(tmp, digits_dir, train={"epochs": 2}, scaling={"num_workers": 1}, tracking={"log_model": True}))
    return res


def test_a_checkpoint_scores_what_the_run_logged_for_its_epoch(trained, digits_dir):
    """The latest checkpoint holds the last epoch's weights: evaluating it gives that epoch's logged test metrics,
    to the last bit, in this process and with Ray Data actors."""
    model = load_source(trained.checkpoint_path, None)
    manifest = Manifest.load(digits_dir)
    here = evaluate(model, manifest, "test", ray=False)
    logged = MlflowClient(trained.tracking_uri).get_run(trained.run_id).data.metrics  # the last epoch's values
    assert {k: here[f"test/{k}"] for k in KEYS} == {k: logged[f"test/{k}"] for k in KEYS}
    assert {k: v for k, v in here.items() if "/class_acc/" in k} == \
        {k: v for k, v in logged.items() if k.startswith("test/class_acc/")}
    on_ray = evaluate(model, manifest, "test", ray=True)
    assert on_ray == here


def test_the_logged_model_scores_what_the_run_selected(trained, digits_dir):
    """runs:/<id>/model (the weights chosen on validation) reproduces the run's best/test metrics exactly."""
    model = load_source(trained.run_id, trained.tracking_uri)  # a bare run id means its logged model
    assert model.run_id == trained.run_id and model.class_counts == Manifest.load(digits_dir).class_counts("train")
    got = evaluate(model, Manifest.load(digits_dir), "test", ray=False)
    assert {k: got[f"test/{k}"] for k in KEYS[:5]} == {k: trained.metrics[f"best/test/{k}"] for k in KEYS[:5]}


def test_predict_writes_every_sample_once_with_its_class_and_probabilities(trained, digits_dir, tmp_path):
    model = load_source(trained.checkpoint_path, None)
    manifest = Manifest.load(digits_dir)
    n = predict(model, manifest, "test", tmp_path / "p.parquet", ray=False)
    t = pq.read_table(tmp_path / "p.parquet")
    assert n == t.num_rows == manifest.num_samples("test")
    test_index = pq.read_table(manifest.shard_paths("test"), columns=["index"]).column("index").to_numpy()
    assert sorted(t.column("index").to_numpy()) == sorted(test_index)
    probs = np.stack(t.column("probs").to_numpy(zero_copy_only=False))  # [N, K]
    assert probs.shape == (n, 10) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    pred, label = t.column("pred").to_numpy(), t.column("label").to_numpy()
    assert np.array_equal(pred, probs.argmax(1))
    top1 = evaluate(model, manifest, "test", ray=False)["test/top1"]
    assert (pred == label).mean() == pytest.approx(top1)
    on_ray = predict(model, manifest, "test", tmp_path / "r.parquet", ray=True)
    r = pq.read_table(tmp_path / "r.parquet").sort_by("index")
    assert on_ray == n and np.array_equal(r.column("pred").to_numpy(), t.sort_by("index").column("pred").to_numpy())
    assert not list(tmp_path.glob(".*partial"))  # written in place only once complete


def test_the_commands_print_log_and_write(trained, digits_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'eval.db'}"
    r = CliRunner().invoke(cli.app, ["evaluate", trained.checkpoint_path, "--data", str(digits_dir),
                                     "--tracking-uri", uri, "--no-ray"])
    assert r.exit_code == 0, r.output
    assert "balanced_acc" in r.output and "MLflow run" in r.output
    c = MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("rwray-evaluate").experiment_id])
    assert run.data.tags["rwray.source"] == trained.checkpoint_path and run.data.params["split"] == "test"
    assert run.data.metrics["test/top1"] == evaluate(load_source(trained.checkpoint_path, None),
                                                     Manifest.load(digits_dir), "test", ray=False)["test/top1"]
    r = CliRunner().invoke(cli.app, ["predict", trained.checkpoint_path, "--data", str(digits_dir), "--split", "val",
                                     "--out", str(tmp_path / "val.parquet"), "--no-ray"])
    assert r.exit_code == 0, r.output
    assert pq.read_table(tmp_path / "val.parquet").num_rows == Manifest.load(digits_dir).num_samples("val")


def test_an_evaluation_of_a_logged_model_is_a_child_of_its_training_run(trained, digits_dir):
    r = CliRunner().invoke(cli.app, ["evaluate", f"runs:/{trained.run_id}/model", "--data", str(digits_dir),
                                     "--split", "val", "--tracking-uri", trained.tracking_uri, "--no-ray"])
    assert r.exit_code == 0, r.output
    c = MlflowClient(trained.tracking_uri)
    exp = c.get_run(trained.run_id).info.experiment_id
    children = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{trained.run_id}'")
    assert len(children) == 1 and children[0].data.tags["rwray.split"] == "val"
    assert children[0].data.metrics["val/balanced_acc"] == pytest.approx(trained.metrics["best/val/balanced_acc"])


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_sources_and_data_are_refused_with_the_reason(trained, digits_dir, tmp_path):
    manifest = Manifest.load(digits_dir)
    good = load_source(trained.checkpoint_path, None)
    for bad, why in [(str(tmp_path), "is not an rwray checkpoint (no state.pt)"),
                     ("0" * 32, "no model at runs:/00000000000000000000000000000000/model"),
                     ("models:/nope/1", "no model at models:/nope/1"),
                     ("s3://bucket/model", "neither a checkpoint folder")]:
        with pytest.raises(SourceError, match=re.escape(why)):
            load_source(bad, trained.tracking_uri)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"weights": torch.zeros(3)}, foreign / "state.pt")
    with pytest.raises(SourceError, match="is not an rwray checkpoint"):
        load_source(str(foreign), None)
    other_classes = Model(good.load, [f"c{i}" for i in range(10)], good.class_counts, good.input_shape, None, "x",
                          None)
    with pytest.raises(DataError, match="another class list.*first differences 0: 'c0' vs '0'"):
        check_data(other_classes, manifest, "test")
    other_shape = Model(good.load, good.classes, good.class_counts, (1, 16, 16), None, "x", None)
    with pytest.raises(DataError, match=r"images of shape \[1, 8, 8\].*the model takes \[1, 16, 16\]"):
        check_data(other_shape, manifest, "test")
    with pytest.raises(DataError, match="no split 'holdout'"):
        check_data(good, manifest, "holdout")
    r = CliRunner().invoke(cli.app, ["evaluate", str(foreign), "--data", str(digits_dir), "--no-log"])
    assert r.exit_code == 2 and "SourceError" in r.output and "Traceback" not in r.output
