"""Bad input: one clear message naming the problem and the fix, raised before compute, nothing left behind."""

import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TinyNet, free_port, job
from rwray.errors import DataError, NonFiniteLoss, ResourceError, TrackingError
from rwray.datainfo import DataInfo
from rwray.methods import METHODS
from rwray.methods.erm import ERMParams
from rwray.train.batches import Batch
from rwray.train.epoch import train_epoch
from rwray.train.launch import run


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "rwray.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_cli_reports_every_config_problem_and_writes_nothing(tmp_path, write_job):
    path = write_job({"output_dir": str(tmp_path / "out"), "data": {"dir": str(tmp_path / "d")},
                      "model": {"name": "resnet33"}, "method": {"name": "erm"}})
    p = _cli("train", str(path), "optim.lr=abc", "bogus.key=1", "method.name=magic", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    err = " ".join(p.stderr.split())  # rich wraps long lines
    assert "3 problems" in err or "4 problems" in err
    assert "model.name: unknown model 'resnet33'; choose one of:" in err and "resnet32" in err
    assert "method.name: unknown method 'magic'" in err
    assert "optim.lr: Input should be a valid number" in err
    assert "bogus: unknown key" in err
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_missing_data_directory(tmp_path):
    cfg = job(tmp_path, tmp_path / "no-such-shards")
    with pytest.raises(DataError, match="does not exist.*rwray data prepare"):
        run(cfg)
    assert not (tmp_path / "runs").exists()


def _copy(digits_dir, tmp_path):
    d = tmp_path / "shards"
    shutil.copytree(digits_dir, d)
    return d


def test_shard_checksum_mismatch(tmp_path, digits_dir):
    d = _copy(digits_dir, tmp_path)
    shard = sorted(d.glob("train-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256"):
        run(job(tmp_path, d))
    assert not (tmp_path / "runs").exists()


def test_label_out_of_range(tmp_path, digits_dir):
    d = _copy(digits_dir, tmp_path)
    shard = sorted(d.glob("train-*.parquet"))[0]
    table = pq.read_table(shard)
    labels = table.column("label").to_pylist()
    labels[0] = 10  # digits has classes 0..9
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))
    pq.write_table(table, shard)
    # keep the checksum consistent so the label check itself must catch it
    manifest = json.loads((d / "manifest.json").read_text())
    import hashlib

    for entry in manifest["splits"]["train"]["shards"]:
        if entry["file"] == shard.name:
            entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    with pytest.raises(DataError, match=r"label.*outside|outside.*\[0, 10\)"):
        run(job(tmp_path, d))


def test_unreachable_tracking_server_fails_before_anything(tmp_path, digits_dir):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TrackingError, match="cannot reach the MLflow tracking server.*Nothing was trained"):
        run(job(tmp_path, digits_dir, tracking={"uri": uri}))
    assert not (tmp_path / "runs").exists()


def test_unreachable_ray_cluster_fails_in_seconds_and_writes_nothing(tmp_path, digits_dir, write_job):
    """ray.init retries an address nobody answers for minutes; rwray says so at once (rayenv.check_address)."""
    import os

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    path = write_job({"output_dir": str(tmp_path / "out"), "data": {"dir": str(digits_dir)},
                      "model": {"name": "small_cnn"}})
    p = subprocess.run([sys.executable, "-m", "rwray.cli", "train", str(path)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": address})
    assert p.returncode == 2, p.stderr
    err = " ".join(p.stderr.split())
    assert f"cannot reach the Ray cluster at RAY_ADDRESS={address}" in err and "ray start --head" in err, err
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_non_finite_loss_names_step_and_samples():
    """Without Ray: the loop stops at the first non-finite per-sample loss and names the offending indices."""
    torch.manual_seed(0)
    model = TinyNet()
    info = DataInfo(3, (5, 5, 5), (1, 2, 2), 15)
    method = METHODS.build(ERMParams(), info)
    x = torch.randn(4, 1, 2, 2)
    x[2, 0, 0, 0] = float("inf")
    good = Batch(torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 0]), torch.tensor([10, 11, 12, 13]))
    bad = Batch(x, torch.tensor([0, 1, 2, 0]), torch.tensor([20, 21, 22, 23]))
    with pytest.raises(NonFiniteLoss) as e:
        train_epoch(model, method, torch.optim.SGD(model.parameters(), lr=0.1), [good, bad], epoch=3)
    assert (e.value.epoch, e.value.step, e.value.indices) == (3, 1, [22])
    assert "epoch 3, step 1, for sample index [22]" in str(e.value)


@pytest.mark.ray
def test_non_finite_loss_on_ray_marks_the_run_failed(tmp_path, digits_dir, ray_local):
    # an absurd learning rate blows the weights up after the first step: the error surfaces unwrapped from Ray
    cfg = job(tmp_path, digits_dir, optim={"lr": 1e30, "momentum": 0.0}, train={"epochs": 1})
    with pytest.raises(NonFiniteLoss, match="non-finite loss at epoch 0, step 1"):
        run(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tests")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FAILED" and "NonFiniteLoss" in r.data.tags["rwray.error"]


@pytest.mark.parametrize("scaling, fix", [({"use_gpu": True}, "scaling.use_gpu=false"),
                                          ({"num_workers": 64}, "scaling.num_workers=")])
def test_a_request_no_node_can_hold_fails_before_training(tmp_path, digits_dir, ray_local, scaling, fix):
    """A GPU on a machine without one, or more workers than the local Ray has CPUs: refused before any worker
    starts (Ray Train would wait for them forever), the MLflow run FAILED with the reason, no checkpoint."""
    cfg = job(tmp_path, digits_dir, scaling=scaling)
    with pytest.raises(ResourceError) as e:
        run(cfg)
    msg = str(e.value)
    assert "The cluster has 1 node: CPU 6," in msg and fix in msg
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (r,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert r.info.status == "FAILED" and r.data.tags["rwray.error"].startswith("ResourceError: cannot start")
    assert not list((tmp_path / "runs" / "ray").glob("*/checkpoint_*"))
