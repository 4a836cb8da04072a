"""An evaluation of a trained model (`rwray evaluate`) as its own MLflow run: the metrics, the source it scored and the
data it scored, linked to the training run where the source names one (a child run of it, in its experiment)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rwray.errors import TrackingError
from rwray.tracking.store import RunLogger
from rwray.tracking.transport import client, quick_http


def log_evaluation(uri: str, model: Any, manifest: Any, split: str, metrics: dict[str, float],
                   classes: Mapping[str, np.ndarray] | None = None) -> tuple[str, str | None]:
    """One finished run holding ``metrics``, the per-class table ``classes`` (columns [K] each) as the artifact
    ``per_class.parquet``, and what produced them. -> (its id, the table's artifact URI or None). ``model``: an
    `rwray.inference.Model`; ``manifest``: the scored data's `rwray.data.Manifest`."""
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException

    try:
        with quick_http(retries=2):
            c = client(uri)
            source_run = c.get_run(model.run_id) if model.run_id else None
            if source_run is not None:
                experiment = source_run.info.experiment_id
            else:
                found = c.get_experiment_by_name("rwray-evaluate")
                experiment = found.experiment_id if found else c.create_experiment("rwray-evaluate")
            tags = {"rwray.source": model.source, "rwray.data_dir": str(manifest.dir), "rwray.split": split,
                    "rwray.data_manifest_sha256": manifest.sha256}
            if source_run is not None:  # shown under the training run in the UI
                tags.update({"mlflow.parentRunId": model.run_id, "rwray.source_run": model.run_id})
            run = c.create_run(experiment, run_name=f"evaluate {manifest.dir.name}/{split}", tags=tags)
            # in batches of MLflow's 1,000 (per-class metrics of a 1,000-class split alone exceed one)
            logger = RunLogger(uri, run.info.run_id)
            logger.metrics(dict(sorted(metrics.items())), step=0)
            where = None
            if classes is not None:
                from rwray import tables

                with tempfile.TemporaryDirectory() as tmp:
                    logger.artifact(tables.write_columns(Path(tmp) / "per_class.parquet", classes))
                where = f"{run.info.artifact_uri}/per_class.parquet"
            c.log_batch(run.info.run_id,
                        params=[Param("source", model.source[:500]), Param("data", str(manifest.dir)[:500]),
                                Param("split", split)],
                        tags=[RunTag("mlflow.note.content", f"rwray evaluate {model.source} --data {manifest.dir} "
                                                            f"--split {split}")])
            c.set_terminated(run.info.run_id, "FINISHED")
            return run.info.run_id, where
    except MlflowException as e:
        raise TrackingError(f"could not log the evaluation to {uri}: {str(e).splitlines()[0][:300]} (the metrics "
                            f"above are complete; rerun with --no-log to skip MLflow)") from None
