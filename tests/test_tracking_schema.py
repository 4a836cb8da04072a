"""A new local MLflow store seeded from the cached empty schema is the store MLflow would have built."""

import sqlite3

import mlflow
from mlflow.tracking import MlflowClient

from rwray.tracking import client
from rwray.tracking.schema import seed_sqlite


def schema(db) -> tuple[list, list]:
    """Every table, index and constraint, and the schema revision. A statement's lines are compared as a set:
    MLflow's own migrations list a rebuilt table's constraints in a different order from one process to the next."""
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        revision = con.execute("SELECT version_num FROM alembic_version").fetchall()
    return [(kind, name, sorted(ln.strip().rstrip(",") for ln in (sql or "").splitlines())) for kind, name, sql in rows
            ], revision


def test_a_seeded_store_has_mlflows_own_schema_and_its_own_default_experiment(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "built").mkdir()
    monkeypatch.chdir(tmp_path / "built")
    built = tmp_path / "built" / "mlflow.db"
    MlflowClient(f"sqlite:///{built}").search_experiments()  # MLflow's migrations, no seeding

    (tmp_path / "seeded").mkdir()
    monkeypatch.chdir(tmp_path / "seeded")  # the Default experiment's location comes from the opening process
    seeded = tmp_path / "seeded" / "mlflow.db"
    c = client(f"sqlite:///{seeded}")
    assert (tmp_path / "cache" / "rwray" / f"mlflow-{mlflow.__version__}.db").is_file()
    assert schema(seeded) == schema(built)
    [default] = c.search_experiments()
    assert default.name == "Default"
    assert default.artifact_location == str(tmp_path / "seeded" / "mlruns" / "0")
    eid = c.create_experiment("e")
    run = c.create_run(eid)
    c.log_metric(run.info.run_id, "m", 1.5)
    assert MlflowClient(f"sqlite:///{seeded}").get_run(run.info.run_id).data.metrics == {"m": 1.5}

    again = tmp_path / "seeded" / "second.db"  # from the cache this time
    client(f"sqlite:///{again}")
    assert schema(again) == schema(built)


def test_an_existing_store_is_never_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    db = tmp_path / "mlflow.db"
    c = client(f"sqlite:///{db}")
    eid = c.create_experiment("kept")
    seed_sqlite(f"sqlite:///{db}")
    assert client(f"sqlite:///{db}").get_experiment(eid).name == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "mlflow.db"]  # no temporary file left


def test_without_a_usable_cache_mlflow_builds_the_store(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache cannot be created under a file
    db = tmp_path / "mlflow.db"
    c = client(f"sqlite:///{db}")
    assert [e.name for e in c.search_experiments()] == ["Default"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "not-a-folder"]
