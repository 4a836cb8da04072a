"""A new local MLflow store starts as a copy of an empty one.

MLflow builds a new sqlite store by running every schema migration since its first release: ~1.5 s of CPU on a
laptop, paid by each new output_dir (every quickstart, test and benchmark run), on the driver's way to the first
step. The result is the same for every store of one MLflow version: the tables and the schema revision, nothing
that names a path (the Default experiment, with its artifact location, is added when a store opens, by
`SqlAlchemyStore` itself). So it is built once per machine and MLflow version, in the user's cache, and copied.

Nothing here is required: any failure leaves the new store for MLflow to build as usual.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rwray"


def seed_sqlite(uri: str) -> None:
    """Before MLflow first opens ``sqlite:///PATH``: when PATH does not exist yet, put an empty store of the
    installed MLflow's latest schema there. Never replaces a file (another process may have created it)."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])
    if path.exists() or not path.parent.is_dir():
        return
    with contextlib.suppress(Exception):
        template = _template()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(template, tmp)
            os.link(tmp, path)  # atomic, and fails if a store appeared meanwhile: that one is kept
        finally:
            tmp.unlink(missing_ok=True)


def _template() -> Path:
    """The cached empty store for this MLflow version, built on first use (atomically: concurrent first runs each
    build one, the last rename wins, every copy is complete)."""
    import mlflow
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    folder = cache_dir()
    template = folder / f"mlflow-{mlflow.__version__}.db"  # one schema per MLflow release
    if template.is_file():
        return template
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".db.tmp")
    os.close(fd)
    try:
        engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
        try:
            _initialize_tables(engine)  # what SqlAlchemyStore runs on an empty database
        finally:
            engine.dispose()
        os.replace(tmp, template)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return template
