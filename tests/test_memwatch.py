"""rwray.memwatch: the peak resident memory of a process tree by kind of process, from /proc's VmHWM."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rwray.memwatch import PeakWatch, kind_of, peak_rss

pytestmark = pytest.mark.skipif(peak_rss(1) is None and sys.platform != "linux", reason="reads Linux's /proc")

# A parent holding ~50 MiB that starts a child holding ~200 MiB, both alive long enough to be sampled.
TREE = """
import subprocess, sys, time
import numpy as np
a = np.ones(50 * 2**20 // 8)
child = subprocess.Popen([sys.executable, "-c", "import numpy as np, time; b = np.ones(200 * 2**20 // 8); "
                          "time.sleep(1.5)"])
child.wait()
time.sleep(0.3)
"""


def test_the_peak_of_each_process_in_the_tree_is_read():
    proc = subprocess.Popen([sys.executable, "-c", TREE])
    with PeakWatch(proc.pid, every_s=0.05) as watch:
        proc.wait()
    peaks = watch.peaks()
    assert list(peaks["driver"]) and 50 * 2**20 < peaks["driver"][0] < 200 * 2**20  # the root, with its 50 MiB
    (child,) = peaks["other process"]
    assert 200 * 2**20 < child < 400 * 2**20  # numpy's 200 MiB plus an interpreter


@pytest.mark.parametrize("title, kind", [
    ("ray::RayTrainWorker", "train worker"),
    ("ray::RayTrainWorker.init_train_context", "train worker"),
    ("ray::_Decoder.decode", "decoding actor"),
    ("ray::TrainController.run", "train controller"),
    ("ray::ReadParquet->MapBatches(_Scorer)", "Ray Data task"),
    ("ray::RuntimeEnvAgent", "Ray system process"),
    ("ray::SynchronizationActor", "other Ray worker"),
    ("ray::IDLE", None),  # a pool worker before its first task: named later
    ("/v/bin/python3 /v/ray/_private/workers/setup_worker.py /v/default_worker.py --node-ip-address=1", None),
    ("/v/ray/core/src/ray/raylet/raylet --python_worker_command=/v/python3 /v/default_worker.py", "Ray system process"),
    ("/v/python3 -u /v/ray/_private/log_monitor.py --session-dir=/tmp/ray/s", "Ray system process"),
    ("/v/bin/python -m rwray.cli train job.yaml", "other process"),
])
def test_kinds_by_title(title, kind):
    assert kind_of(title) == kind
