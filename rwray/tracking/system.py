"""MLflow system metrics of one worker node, for the duration of a training loop.

MLflow's `SystemMetricsMonitor` samples CPU, memory, disk, network (and GPUs, through nvidia-ml-py, where the node
has them) in a daemon thread and logs them to the run as ``system/<node id>/...``. One monitor per node: the local
rank 0 worker runs it, named after its node rank. It talks to the tracking server directly (not through rank 0's
spool): these are observations, best kept when the server answers and never worth holding the run for, so stopping
waits STOP_WAIT_S at most.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

STOP_WAIT_S = 30.0  # the sampler's last server call on a loaded machine; a server that is down costs this once


@contextlib.contextmanager
def node_metrics(uri: str, run_id: str, node: int, interval_s: float) -> Iterator[None]:
    """Sample this node's system metrics every ``interval_s`` seconds while the block runs (0: nothing)."""
    if interval_s <= 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # A node without a GPU library is normal (CPU workers): MLflow's warning about it is not the user's concern.
    logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.ERROR)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, node_id=f"node_{node}", tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        # MLflow's finish() joins the sampling thread without a bound, and that thread may sit in the client's
        # retries while a server is down: signal it, wait briefly, and flush what it queued only if it stopped.
        monitor._shutdown_event.set()
        thread = monitor._process
        if thread is not None:
            thread.join(STOP_WAIT_S)
            if not thread.is_alive():
                with contextlib.suppress(Exception):
                    monitor.mlflow_logger.flush()
