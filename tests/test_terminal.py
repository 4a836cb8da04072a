"""What the terminal shows: rwray's own lines; Ray's and MLflow's go to the run's log file (rwray.output)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rwray import output

BIN = Path(sys.executable).parent


def test_marked_worker_lines_are_shown_and_the_rest_is_filed():
    shown, filed = [], []
    output.route({"lines": [f"{output.MARK}epoch   1/10  loss 1.0", "Reporting training result 1: TrainingReport(...)"],
                  "pid": 41, "ip": "10.0.0.2", "actor_name": "RayTrainWorker"}, shown.append, filed.append)
    assert shown == ["epoch   1/10  loss 1.0"]
    assert filed == ["(RayTrainWorker pid=41, 10.0.0.2) Reporting training result 1: TrainingReport(...)\n"]


def test_lines_that_mean_nothing_on_a_local_ray_are_dropped():
    from rwray.train.rayenv import NO_STATE_API

    filed = []
    cleaner = "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable."
    output.route({"lines": [cleaner, "Detected that the Ray Train controller actor is dead."], "pid": 7, "ip": "x",
                  "actor_name": "PlacementGroupCleaner"}, print, filed.append, drop=NO_STATE_API)
    assert filed == ["(PlacementGroupCleaner pid=7, x) Detected that the Ray Train controller actor is dead.\n"]
    output.route({"lines": [cleaner], "pid": 7, "ip": "x"}, print, filed.append)  # kept where not asked
    assert len(filed) == 2


def test_the_autoscaler_status_table_is_reduced_to_its_events():
    filed = []
    output.route({"lines": ["======== Autoscaler status ========", ":event_summary:Adding 1 node(s) of type gpu"],
                  "pid": "autoscaler", "ip": "10.0.0.1"}, print, filed.append,
                 lambda lines: [ln.split(":event_summary:")[1] for ln in lines if ":event_summary:" in ln])
    assert filed == ["(autoscaler) Adding 1 node(s) of type gpu\n"]


def test_the_driver_loggers_go_to_the_log_file_not_the_terminal(tmp_path, capsys):
    shown = []
    assert output.setup(False, show=shown.append)
    try:
        logging.getLogger("ray.data").info("Dataset train execution finished in 8.72 seconds")
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
        log = output.log_to(tmp_path / "logs" / "run.log")  # lines logged before the file was named go first
        logging.getLogger("ray.train").warning("Failed to query Ray Train Controller actor state")
        output.say("epoch   1/2  loss 0.5")
    finally:
        output.teardown()
    text = log.read_text()
    for line in ("Dataset train execution finished", "Creating initial MLflow database tables",
                 "Failed to query Ray Train Controller actor state"):
        assert text.count(line) == 1
    assert shown == ["epoch   1/2  loss 0.5"]
    err = capsys.readouterr()
    assert "Failed to query" not in err.out + err.err
    assert not output.captured() and logging.getLogger("ray.train").propagate  # handed back


def test_verbose_leaves_the_logs_alone(monkeypatch):
    monkeypatch.setenv(output.VERBOSE_ENV, "1")
    assert not output.setup(False)
    assert not output.captured() and output.log_to("/nonexistent/run.log") is None


@pytest.mark.ray
def test_the_quickstart_prints_its_own_lines_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", output.VERBOSE_ENV)}
    proc = subprocess.run([str(BIN / "rwray"), "quickstart"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(lines[-60:])
    assert len(lines) <= 40, "\n".join(lines)
    ray_lines = [ln for ln in lines if any(s in ln for s in ("TrainingReport", "Failed to query", "execution finished"))]
    assert not ray_lines, "\n".join(lines)
    epochs = [ln for ln in lines if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in epochs] == [f"{e}/10" for e in range(1, 11)] * 2  # each epoch once, per job
    starts = [ln for ln in lines if "MLflow run" in ln and "logs: " in ln]
    assert [ln.split(":")[0] for ln in starts] == ["quickstart-erm", "quickstart-balanced-softmax"]
    for start in starts:  # Ray's own lines are kept, in the file each start line names
        log = Path(re.search(r"logs: (\S+\.log)", start).group(1))
        assert log.parent == tmp_path / "runs" / "logs" and "TrainingReport" in log.read_text()
        assert "Failed to query" not in log.read_text()  # the placement-group cleaner's, once a second
