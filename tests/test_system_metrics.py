"""The per-node system-metrics sampler (rwray.tracking.system), against a real sqlite MLflow store: no Ray."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from mlflow import MlflowClient

from rwray.tracking import system


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("system"))
    return uri, client, run.info.run_id


def _system_keys(client, run_id):
    return sorted(k for k in client.get_run(run_id).data.metrics if k.startswith("system/"))


def test_a_block_shorter_than_one_interval_still_logs_a_sample(store):
    # MLflow's own loop would publish nothing here: its first sample waits a full interval and a get_run round trip.
    uri, client, run_id = store
    with system.node_metrics(uri, run_id, node=3, interval_s=60):
        pass
    keys = _system_keys(client, run_id)
    assert "system/node_3/cpu_utilization_percentage" in keys
    assert "system/node_3/system_memory_usage_megabytes" in keys
    assert all(k.startswith("system/node_3/") for k in keys)
    (cpu,) = client.get_metric_history(run_id, "system/node_3/cpu_utilization_percentage")
    assert cpu.step == 0 and 0 <= cpu.value <= 100


def test_samples_are_numbered_by_step_while_the_block_runs(store):
    uri, client, run_id = store
    key = "system/node_0/cpu_utilization_percentage"
    with system.node_metrics(uri, run_id, node=0, interval_s=0.05):
        # MLflow's batching writes the first sample at once: wait for it (bounded), then stop for the last one
        deadline = time.monotonic() + 60
        while not client.get_metric_history(run_id, key) and time.monotonic() < deadline:
            time.sleep(0.05)
    steps = [m.step for m in client.get_metric_history(run_id, key)]
    assert len(steps) >= 2
    assert sorted(steps) == list(range(len(steps)))  # one step per published sample, none lost at the flush


def test_interval_zero_samples_nothing(store):
    uri, client, run_id = store
    with system.node_metrics(uri, run_id, node=0, interval_s=0):
        pass
    assert _system_keys(client, run_id) == []


def test_a_server_that_is_down_does_not_hold_the_block(monkeypatch):
    # A port nobody listens on: the sampler's client retries, and stopping gives up after STOP_WAIT_S.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(system, "STOP_WAIT_S", 0.2)
    before = {t.ident for t in threading.enumerate()}
    with system.node_metrics(f"http://127.0.0.1:{port}", "0" * 32, node=0, interval_s=0.05):
        pass  # no exception reaches the training loop
    left = [t for t in threading.enumerate() if t.ident not in before]
    assert all(t.daemon for t in left)  # a retrying sampler may linger, but never keeps the worker process alive
