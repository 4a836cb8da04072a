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


def stop_on_fatal_errors():
    """A Ray Train callback (it runs in the controller) that turns a deterministic worker error into a controller
    error, which Ray Train does not retry: without it, a NaN loss would be re-run max_failures times."""
    import ray.train

    class StopOnFatalErrors(ray.train.UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for err in worker_exceptions.values():
                cause = root_cause(err)
                if is_fatal(cause):
                    raise cause

    return StopOnFatalErrors()


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
