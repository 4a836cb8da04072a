"""How rwray talks to an MLflow tracking store: one client, the HTTP settings of callers that retry on their own,
and that one retry schedule (0.5 s doubling to a cap), shared by closing a run and by the spool's sender."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rwray.tracking.schema import seed_sqlite

FIRST_DELAY_S = 0.5

# MLflow draws a progress bar for every artifact download (the best checkpoint the driver fetches to log the model,
# a model `rwray evaluate` loads): noise among rwray's own terminal lines. A user's own setting wins.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def client(uri: str):
    from mlflow.tracking import MlflowClient

    seed_sqlite(uri)  # a new local store: a copy of the cached empty schema, not MLflow's migrations
    return MlflowClient(tracking_uri=uri)


@contextmanager
def quick_http(retries: int = 0, timeout_s: int = 15) -> Iterator[None]:
    """MLflow's REST client retries 7 times with exponential backoff by default (minutes per call while a server is
    down). Callers that retry on their own schedule turn that off for the duration of the block."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: v for k, v in keys.items() if old[k] is None})  # an explicit user setting wins
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)


def retry(attempt: Callable[[], object], wait: Callable[[float], bool], max_delay_s: float,
          on_error: Callable[[Exception], None] = lambda e: None) -> bool:
    """Call ``attempt`` until it returns without raising -> True. After each failure: ``on_error(e)``, then
    ``wait(delay)`` with delay 0.5 s doubling to ``max_delay_s``; a ``wait`` that returns True gives up -> False."""
    delay = FIRST_DELAY_S
    while True:
        try:
            attempt()
            return True
        except Exception as e:  # noqa: BLE001 - any transport or server error is retried the same way
            on_error(e)
        if wait(delay):
            return False
        delay = min(delay * 2, max_delay_s)


def sleep_until(deadline: float) -> Callable[[float], bool]:
    """A `retry` wait that sleeps ``delay`` seconds, or gives up when that would pass ``deadline`` (monotonic)."""
    def wait(delay: float) -> bool:
        if time.monotonic() + delay > deadline:
            return True
        time.sleep(delay)
        return False

    return wait
