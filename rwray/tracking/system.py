"""MLflow system metrics of one worker node, for the duration of a training loop.

MLflow's monitors sample CPU, memory, disk, network (and GPUs, through nvidia-ml-py, where the node has them); they
are logged to the run as ``system/node_<rank>/...``. One sampler per node: the local rank 0 worker runs it, named
after its node rank. It talks to the tracking server directly (not through rank 0's spool): these are observations,
best kept when the server answers and never worth holding the run for, so stopping waits STOP_WAIT_S at most.

MLflow's own loop publishes a sample only after a full interval *and* a `get_run` round trip that finds the run still
RUNNING, and drops the sample in hand when it is stopped, so a run shorter than one interval plus that round trip
(a short run on a loaded machine) logs nothing. Ours publishes every interval and once more at stop: any run that
starts its loop gets at least one sample.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

STOP_WAIT_S = 30.0  # the sampler's last server call on a loaded machine; a server that is down costs this once


def _sampler(run_id: str, uri: str, node: int, interval_s: float):
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class Sampler(SystemMetricsMonitor):
        def monitor(self) -> None:  # runs in MLflow's daemon thread, started by start()
            while True:
                self.collect_metrics()
                stopping = self._shutdown_event.wait(self.sampling_interval)
                try:
                    self.publish_metrics(self.aggregate_metrics())  # queued; flushed by MLflow's batching or at stop
                except Exception:  # the server went away: observations, not worth an error
                    return
                if stopping:
                    return

    return Sampler(run_id, sampling_interval=interval_s, node_id=f"node_{node}", tracking_uri=uri)


@contextlib.contextmanager
def node_metrics(uri: str, run_id: str, node: int, interval_s: float) -> Iterator[None]:
    """Sample this node's system metrics every ``interval_s`` seconds while the block runs (0: nothing)."""
    if interval_s <= 0:
        yield
        return
    # A node without a GPU library is normal (CPU workers): MLflow's warning about it is not the user's concern.
    logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.ERROR)
    sampler = _sampler(run_id, uri, node, interval_s)
    sampler.start()
    try:
        yield
    finally:
        # MLflow's finish() joins the sampling thread without a bound, and that thread may sit in the client's
        # retries while a server is down: signal it, wait briefly, and flush what it queued only if it stopped.
        sampler._shutdown_event.set()
        thread = sampler._process
        if thread is not None:
            thread.join(STOP_WAIT_S)
            if not thread.is_alive():
                with contextlib.suppress(Exception):
                    sampler.mlflow_logger.flush()
