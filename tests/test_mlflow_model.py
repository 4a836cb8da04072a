"""The selected model as an MLflow model, the Model Registry and the runs' dataset inputs, against a real `mlflow
server` (HTTP) and the local sqlite store.

Two real runs share the assertions (`runs`): an EMA run that registers version 1, then a plain one that registers
version 2 of the same name. The served model is checked against the run itself: its test accuracy is the run's
best/test/top1, and its probabilities are those of the best checkpoint's selected (EMA) weights."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import job
from mlflow.tracking import MlflowClient

from rwray.data import Manifest
from rwray.errors import TrackingError
from rwray.tracking import model as logged
from rwray.train import checkpoint

REGISTER = f"rwray-digits-{uuid.uuid4().hex[:8]}"  # the server outlives this module: a name of its own


def fluent(uri: str):
    """`mlflow.pyfunc.load_model("models:/...")` resolves through the global tracking URI: set it for the block and
    put back exactly what was there (MLflow's get_tracking_uri() reports a default even when nothing is set, and
    setting that default back would pin every later test of the process to ./mlflow.db)."""
    return logged.fluent_uri(uri)


def served_images(manifest: Manifest, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """A split's images as the served model takes them, [N, C, H, W] uint8, and their labels [N]."""
    import pyarrow.parquet as pq

    from rwray.train.batches import column_values

    table = pq.read_table(manifest.shard_paths(split), columns=["image", "label"])
    images = column_values(table.column("image")).reshape(-1, *manifest.image_shape)
    return np.array(images), column_values(table.column("label"))  # a writable copy of Arrow's buffers


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_dir, ray_local, mlflow_server):
    from rwray.train.launch import run

    tmp = tmp_path_factory.mktemp("mlflow-model")
    tracking = {"uri": mlflow_server, "experiment": "models", "register": REGISTER, "log_model": True}
    ema = run(job(tmp / "ema", digits_dir, name="ema", tracking=tracking, train={"epochs": 2, "ema_decay": 0.5}))
    plain = run(job(tmp / "plain", digits_dir, name="plain", tracking=tracking, train={"epochs": 1}))
    return ema, plain


def best_state(uri: str, run_id: str, tmp: Path) -> dict:
    path = MlflowClient(uri).download_artifacts(run_id, "checkpoints/best/state.pt", str(tmp))
    return checkpoint.load(Path(path).parent)


def test_the_logged_model_serves_the_selected_ema_weights(runs, digits_dir, mlflow_server, tmp_path):
    import mlflow.pyfunc
    import mlflow.pytorch

    from rwray.data.augment import decode, normalize
    from rwray.models import MODELS
    from rwray.train.epoch import weight_ema

    res, _ = runs
    assert res.model_uri is not None and res.model_version == 1
    c = MlflowClient(mlflow_server)
    entry = c.get_logged_model(res.model_uri.split("/")[-1])  # filed under the run, in its experiment
    assert (entry.source_run_id, entry.experiment_id) == (res.run_id, c.get_run(res.run_id).info.experiment_id)
    assert entry.params["model.name"] == "small_cnn" and entry.tags["rwray.select_metric"] == "val/balanced_acc"
    m = Manifest.load(digits_dir)
    images, labels = served_images(m)
    with fluent(mlflow_server):
        served = mlflow.pyfunc.load_model(res.model_uri)
        probs = served.predict(images)  # uint8 [N, 1, 8, 8] -> [N, 10]
        module = mlflow.pytorch.load_model(res.model_uri)
        info = mlflow.models.get_model_info(res.model_uri)
    assert probs.shape == (len(images), m.num_classes) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # the run's own number for the epoch chosen on validation: the served model reproduces it exactly
    assert (probs.argmax(1) == labels).mean() == pytest.approx(res.metrics["best/test/top1"], abs=1e-12)

    # the best checkpoint's moving average (what was evaluated and selected), rebuilt here by hand
    state = best_state(mlflow_server, res.run_id, tmp_path)
    assert "ema" in state and state["best"]["epoch"] == int(res.metrics["best/epoch"])
    net = weight_ema(MODELS.build(job(tmp_path, digits_dir).model, m.data_info()), 0.5)
    net.load_state_dict(state["ema"])
    net = net.module.eval()
    with torch.no_grad():
        x = normalize(decode(torch.from_numpy(images.reshape(len(images), -1)), m.image_shape),
                      torch.tensor(m.mean), torch.tensor(m.std))
        expected = torch.softmax(net(x), 1).numpy()
    np.testing.assert_array_equal(probs.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(probs, expected, atol=1e-5)

    # the torch module itself: the same function
    assert isinstance(module, torch.nn.Module)
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(images)).numpy(), probs, atol=1e-6)

    # signature, example and the card a user needs
    spec = info.signature.inputs.inputs[0]
    assert spec.type == np.dtype(np.uint8) and spec.shape == (-1, *m.image_shape)
    assert info.signature.outputs.inputs[0].shape == (-1, m.num_classes)
    assert info.saved_input_example_info is not None
    card = info.metadata["rwray"]
    assert card["classes"] == m.classes and card["weights"] == "ema"
    assert card["normalisation"]["mean"] == m.mean and card["model"]["name"] == "small_cnn"
    assert card["epoch"] == state["best"]["epoch"] and card["select_metric"] == "val/balanced_acc"
    assert served.metadata.metadata["rwray"]["classes"] == m.classes  # what the README shows users
    # linking the model to its epoch's metrics added no second value at any step
    assert sorted(x.step for x in c.get_metric_history(res.run_id, "val/balanced_acc")) == [0, 1]


def test_registration_adds_a_version_per_run_tagged_with_the_selection(runs, mlflow_server):
    ema, plain = runs
    c = MlflowClient(mlflow_server)
    versions = sorted(c.search_model_versions(f"name = '{REGISTER}'"), key=lambda v: int(v.version))
    assert [(int(v.version), v.run_id) for v in versions] == [(1, ema.run_id), (2, plain.run_id)]
    for v, res in zip(versions, runs):
        assert v.tags["rwray.select_metric"] == "val/balanced_acc"
        assert float(v.tags["rwray.select_value"]) == pytest.approx(res.metrics["best/val/balanced_acc"], abs=1e-12)
        assert int(v.tags["rwray.epoch"]) == int(res.metrics["best/epoch"])
        assert v.source == res.model_uri
    import mlflow.pyfunc

    with fluent(mlflow_server):  # the registry's URI serves the same model
        assert mlflow.pyfunc.load_model(f"models:/{REGISTER}/2").metadata.model_id == plain.model_uri.split("/")[-1]


def test_every_split_is_a_dataset_input_with_the_manifest_digest(runs, digits_dir, mlflow_server):
    m = Manifest.load(digits_dir)
    run = MlflowClient(mlflow_server).get_run(runs[0].run_id)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == sorted(["train", *m.eval_splits])
    for split, ds in inputs.items():
        assert ds.digest == m.sha256[:36] and ds.name == f"{m.dir.name}/{split}"
        assert json.loads(ds.source) == {"uri": str(m.dir)} and ds.source_type == "local"
        profile = json.loads(ds.profile)
        assert profile["class_counts"] == m.class_counts(split) and profile["manifest_sha256"] == m.sha256
        assert profile["num_samples"] == m.num_samples(split)


def test_a_registry_name_the_server_refuses_fails_before_training(tmp_path, digits_dir, ray_local, mlflow_server):
    from rwray.train.launch import run

    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("refused")
    before = len(c.search_runs([exp.experiment_id])) if exp else 0
    with pytest.raises(TrackingError, match="refuses tracking.register='bad/name'.*Nothing was trained"):
        run(job(tmp_path, digits_dir, tracking={"uri": mlflow_server, "experiment": "refused", "log_model": True,
                                                "register": "bad/name"}))
    exp = c.get_experiment_by_name("refused")
    assert (len(c.search_runs([exp.experiment_id])) if exp else 0) == before  # no run, nothing logged


class Tiny(torch.nn.Module):
    """uint8 [N, 1, 2, 2] -> probabilities [N, 3], as `rwray.train.export.Probabilities` maps images."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, images):
        return torch.softmax(self.fc(images.float().flatten(1) / 255.0), dim=1)


@pytest.mark.parametrize("store", ["sqlite", "http"])
def test_log_model_registers_on_both_stores_and_a_refusal_logs_nothing(store, tmp_path, request):
    """The end-of-run path alone (no training): a version on the local sqlite store and on the server; a name the
    registry refuses raises before the model is logged, so the run holds no model."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if store == "sqlite" else request.getfixturevalue("mlflow_server")
    c = logged.client(uri)
    exp = c.get_experiment_by_name("direct")
    exp_id = exp.experiment_id if exp else c.create_experiment(
        "direct", artifact_location=(tmp_path / "artifacts").as_uri() if store == "sqlite" else None)
    example = np.arange(8, dtype=np.uint8).reshape(2, 1, 2, 2)
    name = f"direct-{uuid.uuid4().hex[:8]}"

    run_id = c.create_run(exp_id).info.run_id
    model_uri, version = logged.log_model(uri, run_id, Tiny().eval(), example, 3, step=0, metadata={},
                                          tags={"rwray.epoch": "0"}, register=name)
    assert version == 1 and c.get_model_version(name, "1").tags["rwray.epoch"] == "0"
    assert logged.logged_model(uri, run_id) == model_uri
    entry = c.get_logged_model(model_uri.split("/")[-1])  # in the run's experiment, READY, with the run's params
    assert (entry.experiment_id, entry.source_run_id, str(entry.status)) == (exp_id, run_id, "READY")
    assert entry.artifact_location.startswith((tmp_path / "artifacts").as_uri()) or store == "http"

    refused = c.create_run(exp_id).info.run_id
    with pytest.raises(TrackingError, match="refuses tracking.register='a:b'.*no model was"):
        logged.log_model(uri, refused, Tiny().eval(), example, 3, step=0, metadata={}, tags={}, register="a:b")
    assert logged.logged_model(uri, refused) is None
    with pytest.raises(TrackingError, match="Nothing was trained"):
        logged.check_registry(uri, "a:b")
    logged.check_registry(uri, name)  # known
    logged.check_registry(uri, f"new-{name}")  # unknown yet: fine, and not created
    assert not c.search_registered_models(f"name = 'new-{name}'")


def test_a_jpeg_shard_model_takes_the_evaluation_crops(tmp_path):
    """Encoded shards: the served input is the eval crop (resize eval_resize, centre crop crop_size) the workers
    decode, [N, 3, S, S] uint8; the served probabilities are the network's on that crop, normalised."""
    import mlflow.pyfunc
    from image_fixtures import write_image_folder

    from rwray import config as C
    from rwray.data import SOURCES, BuilderParams, prepare
    from rwray.data.decode import Decoder, ImageTransform
    from rwray.models import MODELS
    from rwray.train import export
    from rwray.train.batches import column_values

    fx = write_image_folder(tmp_path / "src", num_classes=3, per_class=(4, 3, 2))
    m = prepare(SOURCES["image_folder"].params.model_validate(fx["params"]), tmp_path / "shards",
                BuilderParams(workers=1))
    cfg = C.validate({"name": "jpeg", "output_dir": str(tmp_path / "runs"), "model": {"name": "small_cnn", "width": 4},
                      "data": {"dir": str(m.dir), "crop_size": 16, "eval_resize": 20}})
    torch.manual_seed(0)
    weights = MODELS.build(cfg.model, m.data_info(16)).state_dict()
    state = {"model": weights, "best": {"score": 0.5, "epoch": 0, "cms": {}}}
    net = export.selected_network(cfg, m, state)
    example = export.example_images(cfg, m)
    assert example.shape == (2, 3, 16, 16) and example.dtype == np.uint8

    # the crops, decoded here as a user would from the shard's JPEG bytes
    import pyarrow.parquet as pq

    table = pq.read_table(m.shard_paths("test"), columns=["image", "index"])
    crops = Decoder(ImageTransform(16, 20, "none"), train=False)(
        table.column("image").to_pylist(), column_values(table.column("index")), 0, 0)  # [N, 3, 16, 16] uint8
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = logged.client(uri)
    run_id = c.create_run(c.create_experiment("jpeg", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    model_uri, _ = logged.log_model(uri, run_id, net, example, m.num_classes, step=0,
                                    metadata={"rwray": export.describe(cfg, m, state)}, tags={})
    with fluent(uri):
        served = mlflow.pyfunc.load_model(model_uri)
    probs = served.predict(crops)
    reference = MODELS.build(cfg.model, m.data_info(16)).eval()
    reference.load_state_dict(weights)
    with torch.no_grad():
        x = (torch.from_numpy(crops).float() / 255 - torch.tensor(m.mean).view(1, -1, 1, 1)) \
            / torch.tensor(m.std).view(1, -1, 1, 1)
        np.testing.assert_allclose(probs, torch.softmax(reference(x), 1).numpy(), atol=1e-6)
    assert served.metadata.metadata["rwray"]["input"]["shape"] == [-1, 3, 16, 16]
    with pytest.raises(Exception, match="(?i)shape"):  # another crop size is refused by the signature
        served.predict(np.zeros((2, 3, 20, 20), np.uint8))


def test_concurrent_runs_log_the_same_datasets(tmp_path, digits_dir):
    """A sweep's trials start together in one experiment: every run gets every split as an input, although MLflow's
    store inserts a new dataset non-atomically (the loser of the race retries and links the winner's)."""
    import threading

    from rwray.tracking import log_datasets

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = logged.client(uri)
    exp = c.create_experiment("race", artifact_location=(tmp_path / "art").as_uri())
    m = Manifest.load(digits_dir)
    run_ids = [c.create_run(exp).info.run_id for _ in range(4)]
    errors: list[BaseException] = []
    gate = threading.Barrier(len(run_ids))

    def log(run_id: str) -> None:
        try:
            gate.wait()
            log_datasets(uri, run_id, m)
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    threads = [threading.Thread(target=log, args=(r,)) for r in run_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in run_ids:
        assert sorted(i.dataset.name for i in c.get_run(r).inputs.dataset_inputs) == sorted(
            f"{m.dir.name}/{s}" for s in ("train", *m.eval_splits))
