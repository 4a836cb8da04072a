"""`ray job submit` for real: a head started with `ray start --head` on 127.0.0.1, a digits job submitted with a
working dir, SUCCEEDED, its MLflow run read back; a failing job surfaces its error in `ray job logs` and MLflow."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import free_port

pytestmark = pytest.mark.ray
BIN = Path(sys.executable).parent


def _kill_cluster(temp_dir: Path) -> None:
    """Stop only this head's processes (`ray stop` would stop every Ray on the machine, the tests' own too)."""
    # -ww: whole command lines (without it ps cuts them at the terminal's width, and the temp dir is past that)
    out = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if str(temp_dir) in args and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def ray_head(tmp_path):
    temp_dir = Path("/tmp") / f"rwray-head-{os.getpid()}-{time.time_ns() % 10**8}"  # short: socket paths are limited
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}
    env.pop("RAY_ADDRESS", None)
    # Every port this head listens on is a free one: the tests' own local Ray already holds Ray's fixed defaults
    # (the dashboard agent's 52365 above all), and a head whose agent cannot bind accepts no job, ever.
    ports = {flag: free_port() for flag in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                            "metrics-export-port", "ray-client-server-port")}
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                    *(f"--{flag}={p}" for flag, p in ports.items()), "--num-cpus=4",
                    f"--temp-dir={temp_dir}", "--disable-usage-stats"], env=env, check=True, capture_output=True,
                   timeout=180)
    try:
        yield f"http://127.0.0.1:{ports['dashboard-port']}", env, temp_dir
    finally:
        _kill_cluster(temp_dir)


def _submit(address, env, temp_dir, workdir, *args):
    # The head's job agent starts a little after `ray start` returns; until then the server answers "No available
    # agent" and accepts nothing, so retrying that answer cannot submit a job twice. Bounded: an agent that never
    # comes up fails the test with its own log instead of hanging it.
    deadline = time.monotonic() + 180
    while True:
        p = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(workdir),
                            "--", str(BIN / "rwray"), *args], env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in p.stdout + p.stderr:
            return p
        if time.monotonic() > deadline:
            logs = sorted(temp_dir.glob("session_*/logs/dashboard_agent.log"))
            tail = logs[-1].read_text()[-3000:] if logs else "(no dashboard_agent.log)"
            pytest.fail(f"the head's job agent never came up in 180 s; its log ends:\n{tail}")
        time.sleep(3)


def _plain(p: subprocess.CompletedProcess) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", p.stdout + p.stderr)  # the CLI colours its output


def _submission_id(p: subprocess.CompletedProcess) -> str:
    return re.search(r"raysubmit_\w+", _plain(p)).group(0)


def _status(address, env, sid) -> str:
    p = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, sid], env=env,
                       capture_output=True, text=True, timeout=120)
    return _plain(p)


def _job(tmp_path, digits_dir, name, **optim):
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / "job.yaml").write_text(yaml.safe_dump({
        "name": name, "output_dir": str(tmp_path / "runs"), "data": {"dir": str(digits_dir), "batch_size": 16},
        "model": {"name": "small_cnn", "width": 8}, "optim": {"lr": 0.05, **optim}, "train": {"epochs": 1},
        "scaling": {"num_workers": 2}, "tracking": {"experiment": "jobs"}}))
    return workdir


def test_job_submit_succeeds_and_failure_is_visible(tmp_path, digits_dir, ray_head):
    address, env, temp_dir = ray_head
    ok = _submit(address, env, temp_dir, _job(tmp_path, digits_dir, "ok-job"), "train", "job.yaml")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    sid = _submission_id(ok)
    assert f"Job '{sid}' succeeded" in _status(address, env, sid)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("jobs")
    (run,) = client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'ok-job'")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/balanced_acc")] == [0]

    bad = _submit(address, env, temp_dir, _job(tmp_path, digits_dir, "nan-job", momentum=0.0, lr=1e30), "train", "job.yaml")
    assert bad.returncode != 0
    sid = _submission_id(bad)
    assert f"Job '{sid}' failed" in _status(address, env, sid)
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, sid], env=env,
                          capture_output=True, text=True, timeout=120).stdout
    assert "non-finite loss at epoch 0" in " ".join(logs.split())
    (failed,) = client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'nan-job'")
    assert failed.info.status == "FAILED" and "NonFiniteLoss" in failed.data.tags["rwray.error"]
