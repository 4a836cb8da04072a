"""`rwray train` for real: digits shards -> Ray Data -> 2-worker TorchTrainer -> MLflow, read back with MlflowClient.
Jobs are named in Unicode: MLflow keeps the name, Ray sees its ASCII form (`rwray.paths.ray_safe`)."""

import pytest
from conftest import job
from mlflow.tracking import MlflowClient

from rwray.paths import ray_safe
from rwray.train import checkpoint
from rwray.train.launch import run

pytestmark = pytest.mark.ray
NAME = "实验 ☃ erm"  # Ray encodes run names as ASCII: this name once failed in Ray Train's metrics


def _artifacts(client, run_id, path=""):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def _check_run(client: MlflowClient, run_id: str, epochs: list[int]):
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED"
    assert r.info.run_name == NAME and r.data.params["name"] == NAME
    assert r.data.tags["rwray.ray_run"] == f"{ray_safe(NAME)}-{run_id[:8]}" == f"erm-d9d4d7bb-{run_id[:8]}"
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
    cfg = job(tmp_path, digits_dir, name=NAME, tracking={"experiment": "测试 tests"})
    res = run(cfg)
    assert res.tracking_uri.startswith("sqlite:///") and str(tmp_path) in res.tracking_uri
    client = MlflowClient(res.tracking_uri)
    r = _check_run(client, res.run_id, [0, 1])
    assert client.get_experiment(r.info.experiment_id).name == "测试 tests"
    # the Ray Train folder (and the checkpoint in it) has the ASCII name; the lock folder is rwray's
    ray_dirs = sorted(p.name for p in (tmp_path / "runs" / "ray").iterdir())
    assert ray_dirs == [".locks", f"erm-d9d4d7bb-{res.run_id[:8]}"]
    assert res.checkpoint_path is not None
    assert res.checkpoint_path.startswith(str(tmp_path / "runs" / "ray" / ray_dirs[1]))
    # learning happened on real data: at least twice the 10 % of chance on the balanced test split
    assert res.metrics["test/top1"] > 0.2
    assert 0 <= res.metrics["best/epoch"] <= 1
    # the checkpoint carries the resolved config; resuming continues at epoch 2 and logs only the new epochs. With
    # train.checkpoint_every=2 Ray gets checkpoints after epochs 3 and 4 (the last) only; every epoch is logged once
    resumed = run(job(tmp_path, digits_dir, name=NAME, tracking={"experiment": "测试 tests"},
                      train={"epochs": 5, "checkpoint_every": 2}, resume=res.checkpoint_path))
    steps = [m.step for m in client.get_metric_history(resumed.run_id, "val/balanced_acc")]
    assert sorted(steps) == [2, 3, 4]
    assert resumed.metrics["best/epoch"] >= res.metrics["best/epoch"]
    folder = tmp_path / "runs" / "ray" / f"erm-d9d4d7bb-{resumed.run_id[:8]}"
    assert sorted(checkpoint.load(c)["epoch"] for c in folder.glob("checkpoint_*") if c.is_dir()) == [3, 4]


def test_a_run_without_datasets_starts_no_dataset_manager(ray_local):
    """torch_trainer leaves Ray Data's callback (its DatasetManager actor) out only when no split is a Dataset."""
    import ray.data
    import ray.train
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    from rwray.train.rayenv import torch_trainer

    def kinds(**kw):
        t = torch_trainer(train_loop_per_worker=lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1),
                          **kw)
        return {type(c) for c in t._create_default_callbacks()}

    assert DatasetsCallback not in kinds()
    assert DatasetsCallback in kinds(datasets={"train": ray.data.range(4)})


def test_the_local_scaling_policy_decides_as_rays_fixed_policy_without_the_coordinator():
    """On the Ray a driver started itself, the fixed-size policy's decisions are Ray's, and no
    AutoscalingCoordinator is created or asked (its client stays unset through start, decisions and shutdown)."""
    import asyncio

    import ray.train
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy, ResizeDecision

    from rwray.train.rayenv import local_scaling_policy

    sc = ray.train.ScalingConfig(num_workers=3, resources_per_worker={"CPU": 2})
    ours, rays = local_scaling_policy(sc), FixedScalingPolicy(sc)
    assert isinstance(ours, FixedScalingPolicy)
    ours.after_controller_start(None)
    decision = ours.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision)
    assert (decision.num_workers, decision.resources_per_worker) == (3, {"CPU": 2})
    rays._maybe_send_resource_request = lambda: None  # Ray's would need the coordinator; compare the decision only
    assert decision == rays.make_decision_for_non_running_worker_group()
    assert ours.make_decision_for_running_worker_group(None, None) == rays.make_decision_for_running_worker_group(
        None, None)
    asyncio.run(ours.before_controller_shutdown())
    ours.before_controller_abort()
    assert ours._coordinator_client is None


def test_a_run_on_the_ray_its_driver_started_trains_with_the_local_policy(tmp_path, digits_dir, ray_local,
                                                                          monkeypatch):
    """The policy goes to a real controller (pickled by value, no rwray import there) and the run trains."""
    from rwray.train import rayenv

    made = []
    real = rayenv.local_scaling_policy
    monkeypatch.setattr(rayenv, "_started_here", True)
    monkeypatch.setattr(rayenv, "local_scaling_policy", lambda sc: made.append(sc.num_workers) or real(sc))
    res = run(job(tmp_path, digits_dir, train={"epochs": 1}))
    assert made == [2]
    assert res.metrics["train/loss"] > 0 and 0 <= res.metrics["val/balanced_acc"] <= 1


def test_with_a_weight_ema_the_run_is_scored_on_the_ema(tmp_path, digits_dir, ray_local):
    """train.ema_decay: the checkpoint carries the moving average, and the run's test metrics are those of the
    averaged weights (re-scored here from the checkpoint, on the test shards), not of the raw ones."""
    import pyarrow.parquet as pq
    import torch

    from rwray.data import Manifest
    from rwray.metrics import summarize
    from rwray.models import MODELS
    from rwray.train.batches import Images, arrow_rows
    from rwray.train.epoch import evaluate, weight_ema

    cfg = job(tmp_path, digits_dir, train={"epochs": 2, "ema_decay": 0.9})
    res = run(cfg)
    state = checkpoint.load(res.checkpoint_path)
    assert state["epoch"] == 1 and "ema" in state
    m = Manifest.load(digits_dir)
    info = m.data_info()
    rows = arrow_rows(pq.read_table(m.shard_paths("test")))
    batch = Images(info, m.mean, m.std, torch.device("cpu"))(rows)

    def test_top1(weights: dict) -> float:
        model = MODELS.build(cfg.model, info)
        model.load_state_dict(weights)
        cm = evaluate(model, [batch], info.num_classes).confusion
        return summarize(cm, info.class_counts)["top1"]

    averaged = weight_ema(MODELS.build(cfg.model, info), 0.9)
    averaged.load_state_dict(state["ema"])
    assert res.metrics["test/top1"] == pytest.approx(test_top1(averaged.module.state_dict()), abs=1e-9)
    assert res.metrics["test/top1"] != pytest.approx(test_top1(state["model"]), abs=1e-9)


def test_a_class_balanced_run_trains_on_exact_class_quotas_over_two_workers(tmp_path, digits_dir, ray_local):
    """data.sampler: the realised class mix of every epoch, counted from the rows each worker trained on and
    all-reduced, is the sampler's quota of the epoch (the split's size, cut to a multiple of 2 workers)."""
    import torch

    from rwray.data import Manifest
    from rwray.train.sampling import class_probabilities, class_quotas

    res = run(job(tmp_path, digits_dir, data={"sampler": "class_balanced"}, train={"epochs": 1}))
    m = Manifest.load(digits_dir)
    counts = torch.tensor(m.class_counts("train"))
    quota = class_quotas(class_probabilities(counts, "class_balanced"), (int(counts.sum()) // 2) * 2)
    got = [res.metrics[f"train/class_samples/{c}"] for c in range(len(counts))]
    assert got == [float(q) for q in quota] and len(set(got)) <= 2  # equal up to the remainder
    assert res.metrics["train/samples"] == float(quota.sum())


def test_large_splits_stream_from_ray_data_and_train_the_same_run(tmp_path, digits_dir, ray_local, monkeypatch):
    """A split above SMALL_SPLIT_BYTES is a Ray Dataset each worker streams (get_dataset_shard); a small one one
    object-store table. Same rows in the same (seed, epoch) order: the same run, to the last bit of the loss."""
    from rwray.train import rayenv

    keys = ("train/loss", "val/balanced_acc", "test/top1", "test/balanced_acc", "best/epoch")
    small = run(job(tmp_path / "tables", digits_dir, train={"epochs": 1}))
    monkeypatch.setattr(rayenv, "SMALL_SPLIT_BYTES", -1)  # every split goes the large way
    large = run(job(tmp_path / "ray-data", digits_dir, train={"epochs": 1}))
    assert {k: large.metrics[k] for k in keys} == {k: small.metrics[k] for k in keys}


def test_train_against_real_mlflow_server(tmp_path, digits_dir, ray_local, mlflow_server):
    cfg = job(tmp_path, digits_dir, name=NAME, tracking={"uri": mlflow_server, "experiment": "服务器 server-test"},
              scaling={"num_workers": 2})
    res = run(cfg)
    assert res.tracking_uri == mlflow_server
    _check_run(MlflowClient(mlflow_server), res.run_id, [0, 1])
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing went to the local store


def test_a_run_records_where_its_time_went(tmp_path, digits_dir, ray_local):
    """Per epoch: time waiting for data against training, and each worker's samples/s; per node, system metrics."""
    res = run(job(tmp_path, digits_dir, train={"epochs": 2}, tracking={"system_metrics_s": 1}))
    client = MlflowClient(res.tracking_uri)
    for key in ("time/data_wait_s", "time/train_s", "time/data_wait_frac", "train/samples_per_s/worker_0",
                "train/samples_per_s/worker_1"):
        assert sorted(m.step for m in client.get_metric_history(res.run_id, key)) == [0, 1], key
    assert 0 <= res.metrics["time/data_wait_frac"] <= 1
    assert res.metrics["time/data_wait_s"] <= res.metrics["time/train_s"]
    system = [k for k in client.get_run(res.run_id).data.metrics if k.startswith("system/")]
    assert "system/node_0/cpu_utilization_percentage" in system  # one local node: one sampler, node rank 0
    assert all(k.startswith("system/node_0/") for k in system)
    assert client.get_run(res.run_id).info.status == "FINISHED"  # the sampler's thread did not hold the run
