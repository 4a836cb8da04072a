"""What rwray loads, binds and writes: checkpoints load weights only, paths stay inside their roots, servers bind
loopback. Fast: no Ray, no MLflow server. Results land in docs/reliability.md."""

from __future__ import annotations

import ast
import pathlib
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import job
from reliability_report import Recorder
from rwray.errors import DataError
from rwray.paths import PathError, check_shard_files, inside, require_inside, safe_component
from rwray.train import checkpoint

ROOT = Path(__file__).resolve().parent.parent
RECORD = Recorder("test_security")


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    RECORD.write()


class Payload:
    """Unpickling this creates a file: the stand-in for arbitrary code in a planted checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    ok = tmp_path / "ok"
    checkpoint.save(ok, {"model": {"w": torch.ones(3)}, "epoch": 1, "best": {"score": 0.5, "cms": {}}}, "a: 1\n")
    assert checkpoint.load(ok)["epoch"] == 1  # what rwray writes loads under weights_only=True
    bad, marker = tmp_path / "bad", tmp_path / "PWNED"
    bad.mkdir()
    torch.save({"model": {"w": torch.ones(3)}, "epoch": 1, "extra": Payload(marker)}, bad / checkpoint.STATE)
    with pytest.raises(checkpoint.CheckpointError, match="objects other than tensors.*Unsupported global.*Fix"):
        checkpoint.load(bad)
    assert not marker.exists(), "the payload ran"
    # the same file unpickled without weights_only would run the payload: the refusal is what prevents it
    torch.load(bad / checkpoint.STATE, weights_only=False)
    assert marker.exists()
    RECORD.add("checkpoint-pickle-payload", "state.pt holding an object whose unpickling creates a file",
               "refused (CheckpointError) before anything runs", "refused; the payload did not run (it does when "
               "loaded with weights_only=False)", True, "checkpoints")


def test_resume_must_stay_inside_output_dir(tmp_path):
    out = tmp_path / "runs"
    (out / "ray" / "r-1" / "checkpoint_0").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (out / "ray" / "sneaky").symlink_to(tmp_path / "elsewhere")
    assert require_inside(out, out / "ray" / "r-1" / "checkpoint_0", "resume", "") == \
        (out / "ray" / "r-1" / "checkpoint_0").resolve()
    for bad in (tmp_path / "elsewhere", out / "ray" / ".." / ".." / "elsewhere", out / "ray" / "sneaky"):
        with pytest.raises(PathError, match="resume=.*is outside"):
            require_inside(out, bad, "resume", "Fix: ...")
    # the output root itself may be a symlink (e.g. to a bigger disk): only escaping it is refused
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "ckpt").mkdir()
    (tmp_path / "linked-runs").symlink_to(tmp_path / "disk")
    assert inside(tmp_path / "linked-runs", tmp_path / "linked-runs" / "ckpt")
    RECORD.add("resume-outside-output-dir", "resume= outside output_dir, via '..', via a symlink inside output_dir",
               "refused (PathError)", "all three refused; a symlinked output_dir root itself is accepted", True,
               "paths")


def test_shard_files_must_stay_inside_data_dir(tmp_path, digits_dir):
    d = tmp_path / "shards"
    shutil.copytree(digits_dir, d)
    files = [p.name for p in d.glob("*.parquet")]
    check_shard_files(d, files)  # a clean shard directory passes
    linked = tmp_path / "linked"
    linked.symlink_to(d)
    check_shard_files(linked, files)  # so does a symlink to one (the root is resolved first)
    inner = d / "alias.parquet"
    inner.symlink_to(d / files[0])
    check_shard_files(d, [*files, "alias.parquet"])  # a link that stays inside is fine
    outside = tmp_path / "secret.parquet"
    outside.write_bytes(b"not yours")
    (d / "escape.parquet").symlink_to(outside)
    for bad in (["escape.parquet"], ["../secret.parquet"], [str(outside)]):
        with pytest.raises(DataError, match="lists files outside itself"):
            check_shard_files(d, bad)
    RECORD.add("shard-paths", "manifest entries: a symlink out of data.dir, '../x', an absolute path",
               "refused (DataError) before any file is read", "all refused; links inside data.dir and a symlinked "
               "data.dir root accepted", True, "paths")


def test_run_name_is_one_folder_name():
    assert safe_component("erm-row seed 0", "tracking.run_name") == "erm-row seed 0"
    for bad in ("a/b", "..", ".hidden", "", "x" * 201, "a\\b", "nul\0"):
        with pytest.raises(PathError, match="tracking.run_name="):
            safe_component(bad, "tracking.run_name")
    RECORD.add("run-name", "run names with '/', '\\\\', NUL, '..', a leading '.', empty, > 200 characters",
               "refused (it names a folder under output_dir/ray)", "all refused; 'erm-row seed 0' accepted", True,
               "paths")


def _python_sources() -> list[Path]:
    return sorted([*ROOT.joinpath("rwray").rglob("*.py"), *ROOT.joinpath("tests").glob("*.py"),
                   *ROOT.joinpath("bench").rglob("*.py")])


def test_everything_rwray_and_its_tests_start_binds_loopback():
    """Static check of every place a server or cluster is started (rwray, tests, benchmarks)."""
    problems, seen = [], {"ray.init": 0, "--host": 0, "HTTPServer": 0}
    for path in _python_sources():
        if path.name == Path(__file__).name:
            continue
        text = path.read_text()
        rel = path.relative_to(ROOT)
        for line in text.splitlines():  # allowed only where a test asserts it is absent
            if "0.0.0.0" in line and "not in" not in line:
                problems.append(f"{rel}: binds or mentions 0.0.0.0: {line.strip()}")
        for m in re.finditer(r'"--host",\s*([^\],]+)', text):
            seen["--host"] += 1
            if "127.0.0.1" not in m.group(1):
                problems.append(f"{rel}: --host {m.group(1)}")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name.endswith("ray.init") and not any(k.arg == "address" for k in node.keywords):
                seen["ray.init"] += 1  # starts a local cluster: no dashboard, or a loopback one
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if kw.get("include_dashboard") != "False" and "127.0.0.1" not in kw.get("dashboard_host", ""):
                    problems.append(f"{rel}:{node.lineno}: ray.init without include_dashboard=False")
            if name.endswith("HTTPServer") and node.args:
                seen["HTTPServer"] += 1
                if "127.0.0.1" not in ast.unparse(node.args[0]):
                    problems.append(f"{rel}:{node.lineno}: HTTPServer bound to {ast.unparse(node.args[0])}")
    assert not problems, problems
    assert seen["ray.init"] >= 2 and seen["--host"] >= 2, seen  # the scan did find the places it checks
    cluster = (ROOT / "cluster.yaml").read_text()
    assert "--dashboard-host=127.0.0.1" in cluster
    RECORD.add("loopback", "every ray.init, `--host`, HTTPServer in rwray/, tests/, bench/",
               "local Ray without a dashboard; servers on 127.0.0.1",
               f"{seen['ray.init']} local ray.init without dashboard, {seen['--host']} --host 127.0.0.1, "
               f"{seen['HTTPServer']} HTTPServer on 127.0.0.1; no 0.0.0.0 anywhere. Ray's own internal ports bind "
               f"all interfaces (Ray limitation; token auth protects them)", True, "network")


def test_run_refuses_escaping_paths_before_writing(tmp_path, digits_dir):
    from rwray.train.launch import run

    (tmp_path / "elsewhere").mkdir()
    cfg = job(tmp_path, digits_dir, resume=str(tmp_path / "elsewhere"))
    with pytest.raises(PathError, match="resume="):
        run(cfg)
    cfg = job(tmp_path, digits_dir, tracking={"run_name": "../../etc"})
    with pytest.raises(PathError, match="tracking.run_name"):
        run(cfg)
    assert not (tmp_path / "runs").exists()
    RECORD.add("launch-uses-paths", "rwray run() with resume= outside output_dir / a run name with '/'",
               "refused before anything is written", "both refused; output_dir not created", True, "paths")
