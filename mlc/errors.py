"""Expected failures and their exit codes: one table, read by :func:`mlc.cli.run_job` for every job.

An expected failure (bad data, a missing table, an output that cannot be written, weights that cannot be
fetched, too many unreadable images, ...) ends a job with ``error: <message>`` on stderr and the exit code
of its kind, without a traceback (``--verbose`` adds it). Anything not listed here is a bug: Python's
traceback and exit code 1, as before.

The exception classes live beside the code that raises them (``mlc.data.table.TableError``,
``mlc.distributed.train.NodeLocalStorageError``, ...); this table names them by module and class name, so reading
it imports nothing (no torch, no Ray) and a class is matched through its whole MRO (``ObjectNotFound`` is a
``StorageError``, and the more specific entry wins because it comes first in the MRO). Failures raised in a
Ray worker reach the driver wrapped (``WorkerGroupError.worker_failures``, ``RayTaskError.cause``); the
wrappers are unwrapped so a worker's ``TooManyBadImages`` exits as it would in local mode.
"""

from __future__ import annotations

# Exit codes; documented in docs/errors.md, checked by tests/test_errors.py.
USAGE = 2          # a bad flag or setting (argparse's own code for bad usage)
DATA = 3           # input data: a missing or malformed table, no images folder, none of the listed images found
OUTPUT = 4         # storage: the output cannot be written, access denied
WEIGHTS = 5        # initial weights or a checkpoint that cannot be read or fetched (offline, wrong file)
BAD_IMAGES = 6     # more unreadable images than --max-bad-fraction allows
DIVERGED = 7       # the loss or its gradient became non-finite
RESUME = 8         # an existing checkpoint holds a run with other settings
CLUSTER = 9        # the cluster can never hold the request, or its nodes did not come in time
WORKERS = 10       # Ray workers failed past --max-failures for a reason not listed above
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT (after a step checkpoint in a training run)
TERMINATED = 143   # SIGTERM, as shells report it: a training run stopped after a step checkpoint


class MlcError(Exception):
    """Base of the errors defined in this module; ``exit_code`` says which kind."""
    exit_code = 1


class UsageError(MlcError, ValueError):
    """Flags or settings that do not make a valid run (bad values, an unreadable --config file)."""
    exit_code = USAGE


class DataError(MlcError, ValueError):
    """Input data that cannot make a run: no images folder, none of the listed images there."""
    exit_code = DATA


# "module.Class" -> exit code. Order does not matter: the exception's MRO is walked, most specific first.
KNOWN = {
    "mlc.errors.UsageError": USAGE,
    "mlc.errors.DataError": DATA,
    "mlc.data.table.TableError": DATA,
    "mlc.io.storage.ObjectNotFound": DATA,      # an input (table, image folder) that is not there
    "builtins.FileNotFoundError": DATA,
    "mlc.io.storage.AccessDenied": OUTPUT,
    "mlc.data.pack_write.PackOutputError": OUTPUT,  # --output holds another dataset's pack
    "mlc.io.storage.StorageError": OUTPUT,
    "builtins.PermissionError": OUTPUT,
    "mlc.distributed.train.NodeLocalStorageError": OUTPUT,
    "mlc.model.weights.WeightsError": WEIGHTS,
    "mlc.model.checkpoint.CheckpointError": WEIGHTS,
    "mlc.data.run_data.TooManyBadImages": BAD_IMAGES,
    "mlc.train.engine.NonFiniteLossError": DIVERGED,
    "mlc.model.checkpoint.ConfigMismatch": RESUME,
    "mlc.distributed.cluster.ClusterError": CLUSTER,
    "mlc.eval.scoring.SubmissionError": USAGE,
    "mlc.train.interrupts.Terminated": TERMINATED,
    "mlc.train.interrupts.Interrupted": INTERRUPTED,
}

# Ray's wrappers of a failure elsewhere: unwrapped to find the cause; alone they mean WORKERS.
# Ray 2.60 sets the public classes' __module__ to "ray.train"; the defining module's name is kept too.
RAY_TRAINING_FAILED = ("ray.train.TrainingFailedError", "ray.train.v2.api.exceptions.TrainingFailedError",
                       "ray.exceptions.RayTaskError")


def _names(exc: BaseException) -> list:
    return [f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__]


def causes(exc: BaseException) -> list:
    """``exc`` and what it wraps: ``__cause__``, Ray's ``cause``, a worker group's failures (rank order)."""
    out, todo, seen = [], [exc], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(failures[k] for k in sorted(failures))
        todo.extend([getattr(e, "cause", None), getattr(e, "controller_failure", None), e.__cause__])
    return out


def classify(exc: BaseException) -> tuple[int | None, BaseException]:
    """``(exit code, the exception whose message to print)``; ``(None, exc)`` for a bug."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED, exc
    wrapped = False
    for e in causes(exc):
        for name in _names(e):
            if name in KNOWN:
                return KNOWN[name], e
            if name in RAY_TRAINING_FAILED:
                wrapped = True
    return (WORKERS, exc) if wrapped else (None, exc)


def message(exc: BaseException) -> str:
    """The message of an expected failure, one paragraph: Ray's wrappers add tracebacks to ``str()``."""
    text = str(getattr(exc, "cause", None) or exc) if type(exc).__module__.startswith("ray.") else str(exc)
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    return text.strip() or type(exc).__name__
