"""MLflow tracking: one run per job, created by the driver (`store`), logged into by rank 0 through a durable,
buffered logger (`spool`), both over one client and retry schedule (`transport`). The driver also logs the run's
dataset inputs (`datasets`) and, after training, the selected model and its registry version (`model`).

Which MLflow run a job continues, and from which Ray Train checkpoint, is decided in `rwray.train.identity`.
"""

from rwray.tracking.datasets import log_datasets
from rwray.tracking.spool import BufferedRunLogger, replay, spool_dir
from rwray.tracking.store import (RunLogger, artifact_root, finish, open_store, preflight, resolve_uri, start_run,
                                  store_uri)
from rwray.tracking.transport import client, quick_http

__all__ = ["BufferedRunLogger", "RunLogger", "artifact_root", "client", "finish", "log_datasets", "open_store",
           "preflight", "quick_http", "replay", "resolve_uri", "spool_dir", "start_run", "store_uri"]
