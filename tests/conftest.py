"""Shared fixtures: real digits shards, a real local Ray, a real `mlflow server` process on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rwray import config as C


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """Long-tailed digits (exp, IF 10) written once as real Parquet shards."""
    from rwray.data import SOURCES, BuilderParams, prepare

    out = tmp_path_factory.mktemp("data") / "digits-exp10"
    prepare(SOURCES["digits"].params(name="digits"), out, BuilderParams(imbalance="exp", factor=10, val_per_class=15))
    return out


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")  # CI machines are small and busy
    # logical CPUs: 2 concurrent sweep trials x 1 worker, plus slots for each run's Ray Data tasks (see connect_ray)
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def job(tmp_path: Path, data_dir: Path, **sections) -> C.Config:
    """A small digits job writing everything under tmp_path."""
    raw = {"name": "test", "output_dir": str(tmp_path / "runs"), "data": {"dir": str(data_dir), "batch_size": 16},
           "model": {"name": "small_cnn", "width": 16}, "optim": {"lr": 0.05},
           "train": {"epochs": 2}, "scaling": {"num_workers": 2}, "tracking": {"experiment": "tests"}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return C.validate(raw)


@pytest.fixture
def write_job(tmp_path):
    def _write(raw: dict) -> Path:
        p = tmp_path / "job.yaml"
        p.write_text(yaml.safe_dump(raw))
        return p
    return _write


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 with one worker (no job runner), stopped after the session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, env=env)
    uri = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            if requests.get(uri + "/health", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.5)
    else:
        proc.terminate()
        raise RuntimeError("mlflow server did not answer /health in 90 s")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)
