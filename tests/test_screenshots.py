"""docs/screenshots.py, the README's pictures: it captures both pages of a real run and leaves no process behind."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import job

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(shutil.which("chromium") is None, reason="needs headless Chromium (apt-get install "
                                 "chromium)")]


def test_the_screenshots_of_a_run_are_taken_and_nothing_is_left_running(tmp_path, digits_dir, ray_local):
    from rwray.train.launch import run

    res = run(job(tmp_path, digits_dir, train={"epochs": 1}, scaling={"num_workers": 1}))
    store = tmp_path / "runs"
    assert res.tracking_uri == f"sqlite:///{store / 'mlflow.db'}"
    out = tmp_path / "img"
    for _ in range(2):  # re-runnable: the second run overwrites the first's pictures
        p = subprocess.run([sys.executable, str(ROOT / "docs" / "screenshots.py"), "--store", str(store), "--out",
                            str(out)], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr
    for name in ("mlflow_run.png", "per_class_accuracy.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, name  # a rendered page, not a blank one
    left = subprocess.run(["pgrep", "-f", str(store / "mlflow.db")], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes left behind: {left}"
    left = subprocess.run(["pgrep", "-f", "rwray-shots-"], capture_output=True, text=True).stdout
    assert not left.strip(), f"chromium left behind: {left}"
