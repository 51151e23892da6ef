"""Command-line flags shared by the jobs: one definition, so train, tune and predict cannot drift apart.

Every flag is a field of a config class in :mod:`mlc.config`; its help text is that field's ``metadata["help"]``."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import DEMO_DEFAULTS, ScaleConfig, SweepConfig, TrainConfig
from .errors import UsageError

D = TrainConfig()

def add_train_args(p: argparse.ArgumentParser, skip=()) -> None:
    g = p.add_argument_group("data, model and training")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        if f.name in ("optimizer", "amp"):
            choices = {"optimizer": ["adamw", "sgd"], "amp": ["auto", "bf16", "fp16", "off"]}[f.name]
        else:
            choices = None
        default = getattr(D, f.name)
        kind = type(default) if default is not None else (int if f.name == "loader_workers" else str)
        if kind is bool:
            kind = _bool
        shown = f"default: {default if default is not None else 'auto'}" + (f"; demo: {DEMO_DEFAULTS[f.name]}" if f.name in DEMO_DEFAULTS else "")
        # SUPPRESS: only flags the user gave reach the namespace, so the demo defaults can fill the rest.
        g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=argparse.SUPPRESS, choices=choices,
                       help=f"{f.metadata['help']} ({shown})")
    p.add_argument("--fresh", action="store_true", help="ignore and remove an existing checkpoint in --output and "
                   "start over (default: resume from it)")


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_log_args(p: argparse.ArgumentParser) -> None:
    """--quiet and --verbose, on every job (read by :func:`run_job`)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", action="store_true",
                   help="warnings and errors only: no progress bars or heartbeat lines (default: off)")
    g.add_argument("--verbose", action="store_true",
                   help="debug lines too, and the traceback of an expected error (default: off)")


def run_job(main, parser: argparse.ArgumentParser, argv=None) -> None:
    """Parse the flags, set up the logs, run ``main(args)`` and exit: with its return value when it is an int,
    else 0. An expected failure (:mod:`mlc.errors`) prints ``error: <message>`` on stderr and exits with its
    kind's code, its traceback only with --verbose; anything else is a bug and keeps Python's traceback."""
    import traceback

    from . import errors, logs
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logs.setup(logs.VERBOSE if verbose else logs.QUIET if getattr(args, "quiet", False) else logs.NORMAL)
    try:
        code = main(args)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - classified below; bugs are re-raised
        kind, cause = errors.classify(e)
        if kind is None:
            raise
        sys.stdout.flush()
        if verbose:
            traceback.print_exception(e, file=sys.stderr)
        print(f"error: {errors.message(cause)}", file=sys.stderr, flush=True)
        sys.exit(kind)
    sys.exit(code if isinstance(code, int) else 0)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The flags given, on top of the demo defaults when --data is absent, else the normal defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    base = DEMO_DEFAULTS if given.get("data") is None else {}
    try:
        return TrainConfig(**{**base, **given})
    except ValueError as e:
        raise UsageError(str(e)) from None


S = ScaleConfig()
# Said in the help of both jobs that train on Ray: the batch and the schedule do not depend on the world size.
RESOURCES = ("--gpus-per-worker: default 1 when the node types the cluster can provide (the autoscaler's, or the nodes "
             "up) have GPUs, else 0; only 0 or whole GPUs for training (two ranks on one GPU fail in NCCL). "
             "--cpus-per-worker: default 8 per GPU, capped by the GPU node type's CPUs per GPU; 1 for CPU workers")
def _workers(text: str):
    """``N`` or ``MIN-MAX``."""
    try:
        if "-" in text.strip().lstrip("-"):
            lo, hi = text.split("-", 1)
            return (int(lo), int(hi))
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX (e.g. 2-8), got {text!r}") from None


def _auto_float(text: str):
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def add_scale_args(p: argparse.ArgumentParser, skip=()) -> None:
    g = p.add_argument_group("Ray cluster (ignored with --local)", RESOURCES)
    for f in dataclasses.fields(ScaleConfig):
        if f.name in skip:
            continue
        default = getattr(S, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "num_workers":
            g.add_argument(flag, type=_workers, default=default, help=f"{f.metadata['help']} (default: {default})")
        elif isinstance(default, bool):
            g.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            kind = _auto_float if f.name in ("gpus_per_worker", "cpus_per_worker") else type(default)
            g.add_argument(flag, type=kind, default=default,
                           help=f"{f.metadata['help']} (default: {default if default is not None else 'auto'})")


def scale_from_args(args: argparse.Namespace) -> ScaleConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ScaleConfig) if hasattr(args, f.name)}
    try:
        return ScaleConfig(**given)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _int_list(text: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    d = SweepConfig()
    g = p.add_argument_group("sweep", "Trials at once: as many as the cluster holds once the autoscaler has added "
                             "every node its node types allow (the nodes up now when no autoscaler config is "
                             "readable), never more than --num-samples. " + RESOURCES)
    for f in dataclasses.fields(SweepConfig):
        default = getattr(d, f.name)
        if f.name == "depths":
            g.add_argument("--depths", type=_int_list, default=default,
                           help=f"{f.metadata['help']} (default: {','.join(map(str, default))})")
        elif isinstance(default, bool):
            g.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=f.metadata["help"])
        else:
            kind = (_auto_float if f.name in ("gpus_per_worker", "cpus_per_worker")
                    else float if f.name in ("lr_min", "lr_max", "wait_timeout") else type(default))
            g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                           help=f"{f.metadata['help']} (default: {default if default is not None else 'auto'})")


def sweep_from_args(args: argparse.Namespace) -> SweepConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SweepConfig) if hasattr(args, f.name)}
    try:
        return SweepConfig(**given)
    except ValueError as e:
        raise UsageError(str(e)) from None
