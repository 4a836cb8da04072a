"""The selected model in MLflow: the best checkpoint's network logged as an MLflow model (artifact name ``model``)
and, with ``tracking.register``, a new version of a registered model.

Driver-side, after training (`rwray.train.launch`). The network arrives as a torch module that already maps uint8
images [N, C, H, W] to class probabilities [N, K] (`rwray.train.export`); it is logged with the pytorch flavour in
the ``pt2`` format (``torch.export``: a graph and its tensors, loaded without unpickling code and without rwray
installed). That flavour's own pyfunc feeds it the numpy batch as a tensor, so `mlflow.pyfunc.load_model(uri)
.predict(images)` returns the probabilities and `mlflow.pytorch.load_model(uri)` the module itself: one
artifact, two ways to load it, no custom PythonModel.

A registry name the server refuses is found before training (`check_registry`, which creates nothing) and again
before the model is logged, so a refusal never leaves a logged model without its version.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from rwray.errors import TrackingError
from rwray.tracking.transport import client, quick_http

ARTIFACT = "model"  # the logged model's name: runs:/<run>/model, models:/<model id>
BEST_STATE = "checkpoints/best/state.pt"  # what rank 0 logs at every improvement on validation (rwray.train.loop)
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")


def _refused(uri: str, name: str, e: Exception) -> str:
    code = getattr(e, "error_code", type(e).__name__)
    return (f"the model registry at {uri} refuses tracking.register={name!r} ({code}: {str(e)[:300]}). Fix: choose "
            f"another name (MLflow's own registry refuses '/' and ':'), or grant this user the right to create "
            f"models there, or unset tracking.register")


def check_registry(uri: str, name: str) -> None:
    """Before any compute: the registry accepts ``name`` (or already holds it). Reads only: a model the server
    does not know is fine (created at the end), any other answer is a `TrackingError`."""
    from mlflow.exceptions import MlflowException

    try:
        with quick_http(retries=2):
            client(uri).get_registered_model(name)
    except MlflowException as e:
        if e.error_code not in _MISSING:
            raise TrackingError(_refused(uri, name, e) + ". Nothing was trained.") from None


def download_best_state(uri: str, run_id: str, dest: str | Path) -> Path | None:
    """The run's best checkpoint file, downloaded under ``dest``; None when the run has none (no epoch finished,
    or it is still in a worker's spool on another node)."""
    c = client(uri)
    folder = str(Path(BEST_STATE).parent)
    if not any(f.path == BEST_STATE for f in c.list_artifacts(run_id, folder)):
        return None
    return Path(c.download_artifacts(run_id, BEST_STATE, str(dest)))


def logged_model(uri: str, run_id: str) -> str | None:
    """The model the run already logged (a driver restarted after logging it, before closing the run), or None."""
    run = client(uri).get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    return f"models:/{outputs[-1].model_id}" if outputs else None


@contextlib.contextmanager
def fluent_uri(uri: str) -> Iterator[None]:
    """`mlflow.pytorch.log_model` is fluent: it logs to the global tracking URI. Point it at this run's store for
    the call, then restore both the global and MLFLOW_TRACKING_URI (MLflow's own `_use_tracking_uri` unsets the
    variable when no global was set, which would move the next job of this process to another store)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def log_model(uri: str, run_id: str, module, example: np.ndarray, num_classes: int, *, step: int,
              metadata: Mapping[str, Any], tags: Mapping[str, str], register: str | None = None,
              extra_files: list[str] | None = None) -> tuple[str, int | None]:
    """Log ``module`` (uint8 [N, C, H, W] -> float32 [N, K]) as the run's model ``model``; with ``register``, add a
    version of that registered model tagged with ``tags``. -> (the model's URI, the version or None).

    ``example``: [n >= 2, C, H, W] uint8 images; it traces the graph (its batch dimension stays dynamic) and is stored
    as the input example. ``step``: the selected epoch, so the model is linked to that epoch's metrics."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    _, c, h, w = example.shape
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, c, h, w))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]))
    registry = client(uri)
    if register is not None:  # before anything is logged: a refusal leaves the run without a half-made model
        ensure_registered(uri, register, "The run's metrics and checkpoints are logged; no model was.")
    # Created here, in the run's experiment: left to itself, log_model would file the model under the fluent
    # API's current experiment (Default, with its artifacts under the working directory's ./mlruns).
    run = registry.get_run(run_id)
    entry = registry.create_logged_model(run.info.experiment_id, name=ARTIFACT, source_run_id=run_id,
                                         params=dict(run.data.params), tags=dict(tags))
    with fluent_uri(uri):
        info = mlflow.pytorch.log_model(
            module, name=ARTIFACT, model_id=entry.model_id, run_id=run_id, step=step, signature=signature,
            input_example=example, serialization_format="pt2", metadata=dict(metadata), extra_files=extra_files,
            # torch (and MLflow, added by MLflow) is all a pt2 model needs; naming it skips MLflow's requirement
            # inference, which loads the model again in a subprocess.
            pip_requirements=mlflow.pytorch.get_default_pip_requirements())
        if register is None:
            return info.model_uri, None
        version = add_version(uri, register, info.model_uri, info.model_id, run_id, tags)
    return info.model_uri, version


def ensure_registered(uri: str, name: str, consequence: str) -> None:
    """Registered model ``name`` exists (created when new); a refusal is a `TrackingError` ending ``consequence``."""
    from mlflow.exceptions import MlflowException

    try:
        client(uri).create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in _EXISTS:
            raise TrackingError(_refused(uri, name, e) + ". " + consequence) from None


def add_version(uri: str, name: str, model_uri: str, model_id: str, run_id: str, tags: Mapping[str, str]) -> int:
    """A new version of ``name`` pointing at the logged model. -> its number."""
    from mlflow.exceptions import MlflowException

    with fluent_uri(uri):  # a sqlite registry resolves models:/<id> through the global URI
        try:
            version = client(uri).create_model_version(name, source=model_uri, run_id=run_id, tags=dict(tags),
                                                       model_id=model_id)
        except MlflowException as e:
            raise TrackingError(_refused(uri, name, e) + f". The model is logged as {model_uri}; register it by "
                                "hand once the registry accepts it.") from None
    return int(version.version)


def alias_for(label: str) -> str:
    """A registry alias naming ``label`` (MLflow takes word characters and '-', and reserves 'latest' and 'v<N>'):
    every other run of characters becomes '-'; a reserved result is prefixed with 'row-', an empty one is 'row'."""
    alias = re.sub(r"[^\w-]+", "-", label).strip("-")[:200]
    if not alias:
        return "row"
    return alias if alias.lower() != "latest" and not re.fullmatch(r"[vV]\d+", alias) else f"row-{alias}"


def set_alias(uri: str, name: str, alias: str, version: int) -> None:
    """``models:/name@alias`` now loads ``version`` (an alias moves: the newest reproduction's row wins)."""
    client(uri).set_registered_model_alias(name, alias, str(version))
