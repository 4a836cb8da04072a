"""Which errors end a run at once, and what a wrapped error really was.

Ray Train restarts a worker group that lost a worker up to ``train.max_failures`` times; errors that would only
recur (a non-finite loss, out of memory, bad data, a bug) must stop the run instead. The callback below runs in
Ray Train's controller, so this module imports nothing heavier than `rwray.errors`: whatever it imports, every
controller imports before its workers start.
"""

from __future__ import annotations

from rwray.errors import RwrayError

BUGS = (TypeError, NameError, AttributeError, ImportError, AssertionError, NotImplementedError)


def is_fatal(err: BaseException) -> bool:
    """Errors a restart would only repeat: Ray Train's max_failures is for lost workers, not for these."""
    return isinstance(err, BUGS) or (isinstance(err, RwrayError) and not err.retryable)


def stop_on_fatal_errors(max_failures: int = 0, status_dir: str | None = None, epochs: int = 0):
    """A Ray Train callback (it runs in the controller) that turns a deterministic worker error into a controller
    error, which Ray Train does not retry: without it, a NaN loss would be re-run max_failures times.

    A process killed for memory (`rwray.train.oom`) is retried like any lost worker, within ``max_failures``: on a
    shared node the memory may have gone to a neighbour, and the restart begins from the last checkpoint with fresh
    processes. Each retry is one terminal line naming the kill. A second kill before the restarted workers reported
    another checkpoint means the run runs out of memory at the same point every time: it stops then, as it does
    when the retries are used up, with the `OutOfMemory` report (completed on the driver)."""
    import ray.train

    class StopOnFatalErrors(ray.train.UserCallback):
        def __init__(self):
            self.failures = 0  # worker-group failures so far: what Ray Train counts against max_failures
            self.oom_since_checkpoint = False

        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                self.oom_since_checkpoint = False

        def after_exception(self, run_context, worker_exceptions):
            self.failures += 1
            for err in worker_exceptions.values():
                cause = root_cause(err)
                if is_fatal(cause):
                    raise cause
            from rwray.train import oom, oom_report

            hit = oom.in_failures(worker_exceptions)
            if hit is None:
                return
            repeated = self.oom_since_checkpoint
            if repeated or self.failures > max_failures:
                retries = oom_report.retries_text(self.failures - 1, max_failures, repeated)
                raise oom_report.partial(*hit, retries, status_dir, epochs)
            self.oom_since_checkpoint = True
            from rwray import output

            report = oom_report.partial(*hit, "", status_dir, epochs)
            output.say(oom_report.retry_line(report, self.failures, max_failures))

    return StopOnFatalErrors()


def oom_tolerant_torch_config():
    """Ray Train's TorchConfig whose worker-group shutdown survives a worker the memory monitor killed.

    Ray 2.60's shutdown hook (BackendSetupCallback.before_execution_group_shutdown) tolerates a dead worker's
    RayActorError but not the OutOfMemoryError that the same dead worker raises when Ray's memory monitor killed it:
    the restart Ray Train was about to make turns into a controller error, which is never retried, whatever
    train.max_failures says. Here that error is what it is: the worker is gone, and its process group with it."""
    from dataclasses import dataclass

    from ray.exceptions import OutOfMemoryError
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class OomTolerantTorchBackend(_TorchBackend):
        def on_shutdown(self, worker_group, backend_config):
            try:
                super().on_shutdown(worker_group, backend_config)
            except OutOfMemoryError:
                pass

    @dataclass
    class OomTolerantTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return OomTolerantTorchBackend

    return OomTolerantTorchConfig()


def stopped_from_outside(err: BaseException) -> bool:
    """Ray reports a deliberately killed actor (ray.kill, a Tune trial stopped by its scheduler) as died with exit
    type INTENDED; a crash says SYSTEM_ERROR. Only the message carries it."""
    from ray.exceptions import RayActorError

    return isinstance(err, RayActorError) and "exit type: INTENDED" in str(err)


def root_cause(err: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (TrainingFailedError -> worker error -> cause)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "worker_failures", None)
        if isinstance(inner, dict) and inner:
            err = next(iter(inner.values()))
            continue
        for attr in ("controller_failure", "cause", "__cause__", "error"):
            nxt = getattr(err, attr, None)
            if isinstance(nxt, BaseException):
                err = nxt
                break
        else:
            break
    return err
