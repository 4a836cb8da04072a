"""Sweeps: search-space parsing and errors; a real 4-trial ASHA sweep on digits with parent/child MLflow runs."""

import pytest
from mlflow.tracking import MlflowClient

from conftest import job
from rwray import config as C
from rwray.sweep import load_best, search_space, sweep, trial_config

BASE = {"data": {"dir": "d"}, "model": {"name": "small_cnn"}, "method": {"name": "absgd", "lam": 5.0}}


def _problems(tune):
    with pytest.raises(C.ConfigError) as e:
        C.validate({**BASE, "tune": tune})
    return "\n".join(e.value.problems)


def test_bad_spaces_are_all_reported_with_paths():
    text = _problems({"space": {"method.lamda": {"choice": [1, 2]}, "method.gamma": {"uniform": [0.9, 0.1]},
                                "optim.lr": {"choice": []}, "optim.momentum": {"choice": [0.5, 1.5]},
                                "train.epochs": {"loguniform": [0, 10]}}})
    assert "tune.space.method.lamda=1: method.lamda: unknown key" in text
    assert "tune.space.method.gamma: uniform needs low < high (got [0.9, 0.1])" in text
    assert "tune.space.optim.lr: choice needs at least one value" in text
    assert "tune.space.optim.momentum=1.5: optim.momentum: Input should be less than 1" in text
    assert "tune.space.train.epochs: loguniform needs low > 0" in text


def test_empty_space_and_two_kinds_rejected():
    assert "tune.space is empty" in _problems({"space": {}})
    assert "exactly one of" in _problems({"space": {"optim.lr": {"choice": [0.1], "uniform": [0.1, 0.2]}}})
    assert "search: grid needs every dimension" in _problems({"space": {"optim.lr": {"uniform": [0.1, 0.2]}},
                                                              "search": "grid"})


def test_space_to_tune_and_trial_config():
    from ray import tune

    cfg = C.validate({**BASE, "tune": {"space": {"method.lam": {"choice": [1.0, 5.0]},
                                                 "optim.lr": {"loguniform": [1e-3, 1e-1]},
                                                 "train.seed": {"grid": [0, 1]}}}})
    space = search_space(cfg.tune)
    assert isinstance(space["method.lam"], tune.search.sample.Categorical)
    assert space["train.seed"] == {"grid_search": [0, 1]}
    t = trial_config(cfg.model_dump(mode="json"), {"method.lam": 1.0, "optim.lr": 0.01, "train.seed": 1})
    assert (t.method.lam, t.optim.lr, t.train.seed, t.tune) == (1.0, 0.01, 1, None)


@pytest.mark.ray
def test_asha_sweep_on_digits(tmp_path, digits_dir, ray_local):
    cfg = job(tmp_path, digits_dir, method={"name": "absgd", "lam": 5.0}, train={"epochs": 3},
              scaling={"num_workers": 1},
              tracking={"experiment": "sweep-test", "log_model": True, "register": "sweep-best"},
              tune={"space": {"method.lam": {"choice": [1.0, 3.0, 10.0, 30.0]}}, "num_samples": 4,
                    "max_concurrent": 2, "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2}})
    res = sweep(cfg)
    assert len(res.rows) == 4 and all(r["epochs"] >= 1 for r in res.rows)
    assert any(r["epochs"] < 3 for r in res.rows) or all(r["epochs"] == 3 for r in res.rows)
    client = MlflowClient(res.tracking_uri)
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["rwray.sweep"] == "true"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    assert len(children) == 4
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}
    # Tune ends a trial at its last report; the sweep sent what each trial left in its spool and closed it
    for c in children:
        steps = sorted(m.step for m in client.get_metric_history(c.info.run_id, "val/balanced_acc"))
        assert steps == list(range(len(steps))) and steps, c.info.run_name
        assert "checkpoints/best" in {a.path for a in client.list_artifacts(c.info.run_id, "checkpoints")}
    # tracking.register on a sweep: the best trial's selected weights become version 1, tagged with its run
    (version,) = client.search_model_versions("name='sweep-best'")
    trial_run = client.get_run(version.run_id)
    assert trial_run.data.tags["mlflow.parentRunId"] == res.parent_run_id
    assert float(trial_run.data.params["method.lam"]) == res.best["method.lam"]
    assert float(version.tags["rwray.select_value"]) == res.best[cfg.tune.metric]
    assert parent.data.tags["rwray.registered"] == "sweep-best/1"
    lams = sorted(float(c.data.params["method.lam"]) for c in children)
    assert lams == [1.0, 3.0, 10.0, 30.0] or len(set(lams)) >= 2
    # the best trial's config is a runnable job of its own
    best = load_best(res.best_config_path)
    assert best.tune is None and best.method.lam == res.best["method.lam"]
    from rwray.train.launch import run

    again = run(best.model_copy(update={"train": best.train.model_copy(update={"epochs": 1})}))
    assert client.get_run(again.run_id).info.status == "FINISHED"


@pytest.mark.ray
def test_a_sweep_whose_trials_no_node_can_hold_fails_before_any_trial(tmp_path, digits_dir, ray_local):
    """One trial asks for a GPU the local Ray does not have: the sweep is refused before Tune starts a trial (each
    trial would otherwise wait forever), and the parent MLflow run is FAILED with the reason."""
    from rwray.errors import ResourceError

    cfg = job(tmp_path, digits_dir, scaling={"num_workers": 1, "use_gpu": True}, tracking={"experiment": "sweep-gpu"},
              tune={"space": {"optim.lr": {"choice": [0.01, 0.1]}}, "num_samples": 2, "max_concurrent": 2})
    with pytest.raises(ResourceError, match="scaling.use_gpu=false"):
        sweep(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (parent,) = client.search_runs([client.get_experiment_by_name("sweep-gpu").experiment_id])
    assert parent.info.status == "FAILED" and parent.data.tags["rwray.error"].startswith("ResourceError")
    assert not (tmp_path / "runs" / "tune").exists() or not any((tmp_path / "runs" / "tune").rglob("result.json"))

