"""`rwray train` for real: digits shards -> Ray Data -> 2-worker TorchTrainer -> MLflow, read back with MlflowClient."""

import pytest
from mlflow.tracking import MlflowClient

from conftest import job
from rwray.train.launch import run

pytestmark = pytest.mark.ray


def _artifacts(client, run_id, path=""):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def _check_run(client: MlflowClient, run_id: str, epochs: list[int]):
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["optim.lr"] == "0.05" and r.data.params["scaling.num_workers"] == "2"
    assert len(r.data.tags["rwray.data_manifest_sha256"]) == 64 and "version.ray" in r.data.tags
    for key in ("val/balanced_acc", "test/balanced_acc", "test/top1", "train/loss", "val/few_acc", "test/class_acc/9"):
        hist = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in hist) == epochs, key  # one value per epoch, no gaps or duplicates
        assert all(0 <= m.value <= 1 for m in hist) or key == "train/loss"
    files = _artifacts(client, run_id)
    for f in ("config.yaml", "checkpoints/best/state.pt", "checkpoints/last/model.pt",
              "evaluation/per_class_accuracy.png", "evaluation/confusion_matrix.json"):
        assert f in files, files
    return r


def test_train_embedded_store_two_workers_then_resume(tmp_path, digits_dir, ray_local):
    cfg = job(tmp_path, digits_dir)
    res = run(cfg)
    assert res.tracking_uri.startswith("sqlite:///") and str(tmp_path) in res.tracking_uri
    client = MlflowClient(res.tracking_uri)
    _check_run(client, res.run_id, [0, 1])
    # learning happened on real data: at least twice the 10 % of chance on the balanced test split
    assert res.metrics["test/top1"] > 0.2
    assert 0 <= res.metrics["best/epoch"] <= 1
    # the checkpoint carries the resolved config; resuming continues at epoch 2 and logs only the new epoch
    assert res.checkpoint_path is not None
    resumed = run(job(tmp_path, digits_dir, train={"epochs": 3}, resume=res.checkpoint_path))
    steps = [m.step for m in client.get_metric_history(resumed.run_id, "val/balanced_acc")]
    assert steps == [2]
    assert resumed.metrics["best/epoch"] >= res.metrics["best/epoch"]


def test_train_against_real_mlflow_server(tmp_path, digits_dir, ray_local, mlflow_server):
    cfg = job(tmp_path, digits_dir, tracking={"uri": mlflow_server, "experiment": "server-test"},
              scaling={"num_workers": 2})
    res = run(cfg)
    assert res.tracking_uri == mlflow_server
    _check_run(MlflowClient(mlflow_server), res.run_id, [0, 1])
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing went to the local store
