"""Shared fixtures: real digits shards, a real local Ray, a real `mlflow server` process on 127.0.0.1, and real
two-process torch.distributed groups (gloo on 127.0.0.1)."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rwray import config as C


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world: int, port: int, out_dir: str, fn, args: tuple) -> None:
    """One spawned rank: join the group, run ``fn(rank, world, *args)``, save what it returns (torch.save)."""
    import torch
    import torch.distributed as tdist

    from rwray import dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                             timeout=datetime.timedelta(seconds=60))
    try:
        assert dist.world_size() == world and dist.rank() == rank  # the collectives really run
        torch.save(fn(rank, world, *args), os.path.join(out_dir, f"rank{rank}.pt"))
        tdist.barrier()  # no rank tears its gloo pairs down while a peer may still be using them
    finally:
        tdist.destroy_process_group()


@pytest.fixture
def gloo(tmp_path):
    """``gloo(fn, *args, world=2, meanwhile=None)``: run module-level ``fn(rank, world, *args)`` in ``world`` real
    processes joined by a gloo group; returns what each rank returned, in rank order. ``meanwhile`` (a callable)
    runs in this process while the ranks do (the single-process reference, say); then ``(ranks, its result)``."""
    import torch
    import torch.multiprocessing as mp

    def run(fn, *args, world: int = 2, meanwhile=None):
        out = tmp_path / "gloo"
        out.mkdir(exist_ok=True)
        procs = mp.spawn(_gloo_rank, args=(world, free_port(), str(out), fn, args), nprocs=world, join=False)
        local = meanwhile() if meanwhile is not None else None
        while not procs.join():
            pass
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]
        return ranks if meanwhile is None else (ranks, local)

    return run


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """Long-tailed digits (exp, IF 10) written once as real Parquet shards."""
    from rwray.data import SOURCES, BuilderParams, prepare

    out = tmp_path_factory.mktemp("data") / "digits-exp10"
    prepare(SOURCES["digits"].params(name="digits"), out, BuilderParams(imbalance="exp", factor=10, val_per_class=15))
    return out


def pytest_collection_modifyitems(items):
    """A test that uses the shared local Ray (directly or through another fixture) is a `ray` test, marked or not:
    `-m "not ray"` must never start a cluster."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")  # CI machines are small and busy
    # logical CPUs: 2 concurrent sweep trials x 1 worker, plus slots for each run's Ray Data tasks (see connect_ray)
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


class TinyNet(torch.nn.Module):
    """A linear classifier over flattened 1x2x2 inputs (3 classes) with the models' forward signature: loop tests
    without a real network."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x, return_features=False):
        feats = x.flatten(1)
        return (self.fc(feats), feats) if return_features else self.fc(feats)


def job(tmp_path: Path, data_dir: Path, **sections) -> C.Config:
    """A small digits job writing everything under tmp_path."""
    raw = {"name": "test", "output_dir": str(tmp_path / "runs"), "data": {"dir": str(data_dir), "batch_size": 16},
           "model": {"name": "small_cnn", "width": 16}, "optim": {"lr": 0.05},
           "train": {"epochs": 2}, "scaling": {"num_workers": 2},
           # log_model (an MLflow model at the end, ~4 s a run) and system metrics (a sampling thread per node) are
           # tested where they are asked for (tests/test_mlflow_model.py, test_train_e2e.py)
           "tracking": {"experiment": "tests", "log_model": False, "system_metrics_s": 0}}
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
