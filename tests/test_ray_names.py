"""Any Unicode job / run / experiment name: MLflow keeps it as written, Ray sees only `paths.ray_safe` of it
(Ray encodes run names as ASCII). No Ray is started here; tests/test_train_e2e.py trains under such a name."""

import hashlib
from pathlib import Path

import pytest
from conftest import job
from mlflow.tracking import MlflowClient

from rwray.paths import ray_safe, safe_component
from rwray.tracking import resolve_uri, spool_dir
from rwray.train.identity import RunLock, start_or_resume


def _h(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:8]


@pytest.mark.parametrize("name, expected", [
    ("test", "test"),  # plain ASCII of [A-Za-z0-9._-] comes back unchanged (existing Ray folders keep their names)
    ("x.y_z-1", "x.y_z-1"),
    ("实验 ☃", "run-5d805657"),  # nothing ASCII left
    ("实验 ☃ erm", "erm-d9d4d7bb"),
    ("Café", "Cafe-73473dcc"),  # accents dropped (NFKD), not turned into '-'
    ("Crème brûlée", "Creme-brulee-364046a7"),
    ("ﬁle №1", "file-No1-67a2d048"),  # compatibility forms spelled out
    ("erm-row seed 0", "erm-row-seed-0-77d1fafe"),  # spaces are changed too
    ("..", "run-5ec1f7e7"),
    (".hidden", "hidden-16924190"),  # never a hidden folder
    ("", "run-e3b0c442"),
])
def test_ray_safe_pinned(name, expected):
    assert ray_safe(name) == expected
    if expected != name:
        assert expected.endswith("-" + _h(name))  # the hash is of the name as written


def test_ray_safe_is_ascii_one_folder_and_never_collides():
    names = ["实验", "试验", "实验 ☃", "実験", "Café", "Cafe\u0301", "Cafe", "Cafe ", "a b", "a  b", "a/b",
             "é" * 300]
    out = [ray_safe(n) for n in names]
    assert len(set(out)) == len(names)  # 'Café' composed and decomposed, 'a b' and 'a  b' all differ
    for n, r in zip(names, out):
        assert r.isascii() and "/" not in r and not r.startswith(".") and len(r) <= 129, (n, r)
        assert ray_safe(n) == r  # stable
    assert out[-1] == "e" * 120 + "-" + _h("é" * 300)  # long names are cut, the hash keeps them apart


def test_unicode_names_are_valid_folder_names():
    assert safe_component("实验 ☃", "name") == "实验 ☃"
    assert safe_component("Café", "tracking.run_name") == "Café"


def test_mlflow_keeps_unicode_names_and_ray_gets_ascii(tmp_path):
    """sqlite store: experiment, run name, tags and filters in Unicode; the Ray run name recorded is ASCII."""
    cfg = job(tmp_path, tmp_path / "d", name="实验 ☃ erm", tracking={"experiment": "实验组 ☃"})
    uri = resolve_uri(cfg)
    with RunLock(cfg) as lock:  # the lock file is named by a hash of output_dir + run name
        assert lock.path.name.isascii() and lock.path.suffix == ".lock"
        handle = start_or_resume(cfg, uri, "0" * 64, {"rwray.row": "Café ☃"})
    assert handle.ray_name == f"erm-d9d4d7bb-{handle.run_id[:8]}" and not handle.resumed
    assert Path(spool_dir(cfg, handle.run_id)).name == handle.run_id  # spool folders are named by run id
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("实验组 ☃")
    (r,) = c.search_runs([exp.experiment_id], "attributes.run_name = '实验 ☃ erm'")
    assert r.info.run_id == handle.run_id and r.info.run_name == "实验 ☃ erm"
    assert r.data.tags["mlflow.runName"] == "实验 ☃ erm" and r.data.tags["rwray.row"] == "Café ☃"
    assert r.data.tags["rwray.ray_run"] == handle.ray_name and r.data.params["name"] == "实验 ☃ erm"
    assert r.data.tags["mlflow.note.content"] == "rwray job 实验 ☃ erm"
    (tagged,) = c.search_runs([exp.experiment_id], "tags.`rwray.row` = 'Café ☃'")
    assert tagged.info.run_id == handle.run_id
