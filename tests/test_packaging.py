"""What a user gets from `pip install .` (a wheel, not a checkout): every module and the bundled recipes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_every_module_and_the_quickstart_recipes(tmp_path):
    # Built from a copy (setuptools writes build/ and *.egg-info beside the sources; the tree stays untouched), with
    # the test venv's setuptools (--no-build-isolation: nothing is fetched).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "rwray", src / "rwray", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, cwd=tmp_path, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("rwray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rwray").rglob("*.py")}
    assert modules <= names, f"missing from the wheel: {sorted(modules - names)}"
    recipes = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rwray" / "recipes").glob("*.yaml")}
    assert {"rwray/recipes/quickstart.yaml", "rwray/recipes/quickstart_balanced_softmax.yaml"} <= recipes <= names
    assert not any(n.startswith(("jobs/", "tests/", "bench/")) for n in names)  # the product's package only


def test_the_reliability_recorder_writes_outside_the_tree(tmp_path, monkeypatch):
    """A test run must not change tracked files: rows go to a temporary store unless the regenerating command
    (bench/reliability_report.py) names the committed one."""
    import reliability_report as rr

    monkeypatch.delenv(rr.ENV, raising=False)
    assert ROOT not in rr.store().parents
    monkeypatch.setenv(rr.ENV, str(tmp_path / "reliability"))
    rec = rr.Recorder("test_example")
    rec.add("case-1", "tried /tmp/abc at 127.0.0.1:5000", "an error", "it failed", True)
    rec.write()
    assert (tmp_path / "reliability" / "test_example.json").is_file()
    text = (tmp_path / "reliability.md").read_text()
    assert "| case-1 |  | tried <tmp> at 127.0.0.1:<port> | an error | it failed | yes |" in text
