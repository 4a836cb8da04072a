"""The one scaffold for running jobs as Ray Tune trials: `rwray tune` (a search space) and `rwray reproduce`
(a table's rows x seeds) are both a parent MLflow run, a Tuner whose trials are small drivers, and one
TorchTrainer per trial (`rwray.train.launch.run`), so a trial may itself use many workers and Tune's report
callback sees every epoch (ASHA stops trials from it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from rwray import output
from rwray.config import Config
from rwray.paths import ray_safe


@dataclass(frozen=True)
class Parent:
    uri: str
    run_id: str


@contextlib.contextmanager
def parent_run(cfg: Config, data: Sequence[Config], tags: Mapping[str, str]) -> Iterator[Parent]:
    """Cheap checks first (tracking store, every data set prepared and verified once, before any trial starts),
    then the parent MLflow run, marked FINISHED, FAILED or KILLED when the block ends."""
    from rwray import tracking
    from rwray.train.preflight import ensure_data

    uri = tracking.resolve_uri(cfg)
    tracking.preflight(uri)
    shas = {str(c.data.dir): ensure_data(c).sha256 for c in data}
    run_id = tracking.start_run(cfg, uri, ",".join(sorted(set(shas.values())))[:5000], tags)
    error: BaseException | None = None
    try:
        yield Parent(uri, run_id)
    except BaseException as e:
        error = e
        raise
    finally:
        tracking.finish(uri, run_id, error)


def tune_name(cfg: Config, parent: Parent) -> str:
    """Tune's run name and folder under output_dir/<kind>: ASCII (`ray_safe`); the MLflow runs keep cfg.name."""
    return f"{ray_safe(cfg.name)}-{parent.run_id[:8]}"


def fit(trial: Callable[[dict[str, Any]], None], param_space: dict[str, Any], tune_config: Any, cfg: Config,
        parent: Parent, kind: str, concurrent: int):
    """Run the trials on Ray (joined or started for ``concurrent`` trials at once); returns Tune's ResultGrid.
    Tune's own files go to ``output_dir/<kind>/<tune_name>``."""
    import ray.tune as tune

    from rwray.train.launch import log_path
    from rwray.train.rayenv import connect_ray
    from rwray.train.resources import check

    logs = output.log_to(log_path(cfg, tune_name(cfg, parent)))
    if logs is not None:
        output.say(f"{cfg.name}: Ray Tune trials on up to {concurrent} at once; logs: {logs}")
    connect_ray(cfg, concurrent_runs=concurrent)
    # One trial's workers must fit the cluster (else every trial would wait forever); trials beyond what the
    # nodes hold side by side run after the others.
    fits = check(cfg, trials=concurrent, say=output.say)
    if fits < concurrent:
        output.say(f"the cluster holds {fits} of {concurrent} trials at once (tune.max_concurrent): the rest queue")
        tune_config.max_concurrent_trials = fits
    tuner = tune.Tuner(
        # The trial function is only a driver: its TorchTrainer's workers reserve the real resources.
        tune.with_resources(trial, {"CPU": 0.01}),
        param_space=param_space,
        tune_config=tune_config,
        run_config=tune.RunConfig(name=tune_name(cfg, parent), storage_path=cfg.storage(kind),
                                  # Tune's status tables would bury the trials' epoch lines; --verbose shows them
                                  verbose=0 if output.captured() else 1),
    )
    return tuner.fit()


def run_trial(cfg: Config, parent_run_id: str, tags: Mapping[str, str] | None = None) -> None:
    """Inside a Tune trial: train ``cfg`` as a child run of the parent, reporting every epoch to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from rwray.train.launch import run

    run(cfg, parent_run_id=parent_run_id, callbacks=[TuneReportCallback()], tags=dict(tags or {}))
