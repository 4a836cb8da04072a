"""Paper tables: table files validate with every row; the report renders from recorded MLflow runs; a small table
reproduces for real (rows x seeds as a Tune grid)."""

import pytest
import yaml
from mlflow.tracking import MlflowClient

from rwray import config as C
from rwray.report import report
from rwray.reproduce import load_table, reproduce


def _table(tmp_path, data_dir, rows, seeds=(0, 1), name="tbl"):
    for label, method, ref in rows:
        (tmp_path / f"{label}.yaml").write_text(yaml.safe_dump({
            "name": label, "output_dir": str(tmp_path / "runs"), "data": {"dir": str(data_dir), "batch_size": 16},
            "model": {"name": "small_cnn", "width": 8}, "method": method, "train": {"epochs": 1},
            "scaling": {"num_workers": 1}, **({"reference": ref} if ref else {})}))
    t = tmp_path / "table.yaml"
    t.write_text(yaml.safe_dump({"name": name, "title": "A test table", "seeds": list(seeds), "max_concurrent": 2,
                                 "rows": [{"job": f"{label}.yaml"} for label, _, _ in rows]}))
    return t


REF = {"value": 60.0, "metric": "test/top1", "source": "Someone et al. 2020, Table 1"}


def test_bad_table_reports_every_row_problem(tmp_path):
    t = _table(tmp_path, tmp_path / "d", [("a", {"name": "erm"}, REF), ("b", {"name": "absgd", "lam": 0}, None)])
    raw = yaml.safe_load(t.read_text())
    raw["rows"].append({"job": "missing.yaml"})
    t.write_text(yaml.safe_dump(raw))
    with pytest.raises(C.ConfigError) as e:
        load_table(t)
    text = str(e.value)
    assert "b.yaml: method.lam: ABSGD lambda must be a nonzero number" in text
    assert "missing.yaml: no such job file" in text


def test_report_renders_from_recorded_runs(tmp_path):
    t = _table(tmp_path, tmp_path / "d", [("erm-row", {"name": "erm"}, REF), ("absgd-row", {"name": "absgd"}, None)])
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    (tmp_path / "runs").mkdir()
    c = MlflowClient(uri)
    exp = c.create_experiment("tbl", artifact_location=(tmp_path / "artifacts").as_uri())  # not ./mlruns
    parent = c.create_run(exp, tags={"rwray.table": "tbl"}).info.run_id
    for row, values in (("erm-row", [0.5, 0.6]), ("absgd-row", [0.7, 0.8])):
        for seed, v in enumerate(values):
            r = c.create_run(exp, tags={"mlflow.parentRunId": parent, "rwray.table": "tbl", "rwray.row": row})
            c.log_metric(r.info.run_id, "best/test/top1", v)
            c.log_metric(r.info.run_id, "best/test/balanced_acc", v - 0.1)
            c.set_terminated(r.info.run_id, "FINISHED")
    text = report(t, tmp_path / "report.md")
    assert "| erm-row | test/top1 | 55.0 ± 7.1 | 2 | 60.0 | Someone et al. 2020, Table 1 |" in text
    assert "| absgd-row | test/balanced_acc | 65.0 ± 7.1 | 2 | - |  |" in text
    assert (tmp_path / "report.md").read_text() == text and (tmp_path / "report.png").stat().st_size > 1000
    assert "report/table.md" in [a.path for a in c.list_artifacts(parent, "report")]


def test_report_extra_columns(tmp_path):
    t = _table(tmp_path, tmp_path / "d", [("row", {"name": "erm"}, None)])
    raw = yaml.safe_load(t.read_text())
    raw["columns"] = [{"metric": "test_unbiased/top1", "label": "unbiased"},
                      {"metric": "pscore/spearman_vs_class_count", "at": "last", "percent": False, "label": "rho"}]
    t.write_text(yaml.safe_dump(raw))
    (tmp_path / "runs").mkdir()
    c = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = c.create_experiment("tbl", artifact_location=(tmp_path / "artifacts").as_uri())  # not ./mlruns
    parent = c.create_run(exp, tags={"rwray.table": "tbl"}).info.run_id
    for seed, (acc, unb, rhos) in enumerate([(0.9, 0.3, [0.1, 0.5]), (0.8, 0.5, [0.2, 0.7]), (0.1, 0.1, [0.9])]):
        r = c.create_run(exp, tags={"mlflow.parentRunId": parent, "rwray.table": "tbl", "rwray.row": "row"})
        c.log_metric(r.info.run_id, "best/test/balanced_acc", acc)
        c.log_metric(r.info.run_id, "best/test_unbiased/top1", unb)
        for step, rho in enumerate(rhos):  # the last value is the one reported
            c.log_metric(r.info.run_id, "pscore/spearman_vs_class_count", rho, step=step)
        c.set_terminated(r.info.run_id, "FINISHED" if seed < 2 else "FAILED")  # a failed run is left out
    text = report(t)
    assert "| row | metric | ours | unbiased | rho | seeds | paper | source |" in text
    assert "| row | test/balanced_acc | 85.0 ± 7.1 | 40.0 ± 14.1 | 0.60 ± 0.14 | 2 | - |  |" in text

    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nintro\n\n<!-- report:tbl:begin -->\nstale\n<!-- report:tbl:end -->\n\nafter\n")
    report(t, into=doc)
    report(t, into=doc)  # regenerating replaces the section, nothing else
    body = doc.read_text()
    assert body == f"# Results\n\nintro\n\n<!-- report:tbl:begin -->\n{text.rstrip()}\n<!-- report:tbl:end -->\n\nafter\n"
    fresh = tmp_path / "new.md"
    report(t, into=fresh)  # no section yet: appended with its markers
    assert fresh.read_text() == f"<!-- report:tbl:begin -->\n{text.rstrip()}\n<!-- report:tbl:end -->\n"


@pytest.mark.ray
def test_reproduce_small_table_for_real(tmp_path, digits_dir, ray_local):
    t = _table(tmp_path, digits_dir, [("erm-row", {"name": "erm"}, REF), ("bs-row", {"name": "erm", "loss": {"name": "balanced_softmax"}}, None)],
               seeds=(0, 1), name="tbl-real")
    parent = reproduce(t, ["tracking.register=tbl-models"])
    c = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("tbl-real").experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted((r.data.tags["rwray.row"], r.data.tags["rwray.seed"]) for r in runs) == [
        ("bs-row", "0"), ("bs-row", "1"), ("erm-row", "0"), ("erm-row", "1")]
    assert all(r.info.status == "FINISHED" for r in runs)
    text = report(t)
    assert "| erm-row | test/top1 |" in text and "| 2 | 60.0 |" in text

    # tracking.register: one version per row, its seed chosen on validation (never test), aliased by the row
    versions = {v.tags["rwray.row"]: v for v in c.search_model_versions("name = 'tbl-models'")}
    assert sorted(versions) == ["bs-row", "erm-row"]
    for row, v in versions.items():
        mine = [r for r in runs if r.data.tags["rwray.row"] == row]
        chosen = max(mine, key=lambda r: r.data.metrics["best/val/balanced_acc"])
        assert v.run_id == chosen.info.run_id and v.tags["rwray.seed"] == chosen.data.tags["rwray.seed"]
        assert float(v.tags["rwray.select_value"]) == chosen.data.metrics["best/val/balanced_acc"]
        assert c.get_model_version_by_alias("tbl-models", row).version == v.version
    assert sorted(c.get_run(parent).data.tags["rwray.registered"].split(",")) == ["tbl-models/1", "tbl-models/2"]


def test_alias_names_follow_the_registry_rules():
    from rwray.tracking.model import alias_for

    assert alias_for("erm-row") == "erm-row"
    assert alias_for("BALMS (R10, 90 ep.)") == "BALMS-R10-90-ep"
    assert alias_for("latest") == "row-latest" and alias_for("v2") == "row-v2" and alias_for("...") == "row"
    assert alias_for("实验 ☃") == "实验"  # MLflow's rule is \w: letters of any script are kept
