"""Command-line flags shared by the jobs: one definition, so train, tune and predict cannot drift apart.

Every flag is a field of a config class in :mod:`mlc.config`; its help text is that field's ``metadata["help"]``."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from mlc.config import ScaleConfig, SweepConfig, TrainConfig, choices_of
from mlc.data.demo import DEMO_DEFAULTS
from mlc.errors import UsageError

D = TrainConfig()

def add_train_args(p: argparse.ArgumentParser, skip=()) -> None:
    g = p.add_argument_group("data, model and training")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        choices = f.metadata.get("choices")
        default = getattr(D, f.name)
        kind = type(default) if default is not None else \
            {"loader_workers": _auto_int, "store_budget": _auto_float}.get(f.name, str)
        shown = f"default: {default if default is not None else 'auto'}" + (f"; demo: {DEMO_DEFAULTS[f.name]}" if f.name in DEMO_DEFAULTS else "")
        # SUPPRESS: only flags the user gave reach the namespace, so a --config file and the demo defaults can
        # fill the rest.
        if kind is bool:
            g.add_argument("--" + f.name.replace("_", "-"), action=BoolFlag, default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} ({shown})")
            continue
        if f.name == "compile":  # a switch with a third value: --compile (on), --no-compile (off), --compile auto
            g.add_argument("--compile", "--no-compile", action=CompileFlag, default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']}; --compile alone is on, --no-compile off ({shown})")
            continue
        g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=argparse.SUPPRESS, choices=choices,
                       help=f"{f.metadata['help']} ({shown})")
    p.add_argument("--fresh", action="store_true", help="start over: the previous run in --output is replaced once "
                   "every check before training has passed (tables, images, flags, weights), never before "
                   "(default: resume from its checkpoint)")


def _auto_int(text: str):
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


class CompileFlag(argparse.Action):
    """``--compile [auto|on|off]`` (alone: on) and ``--no-compile`` (off): a switch, as every boolean setting is,
    with a third value, auto (the default)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", metavar="auto|on|off", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string == "--no-compile":
            if value is not None:
                parser.error(f"argument --no-compile: takes no value, got {value!r}")
            setattr(namespace, self.dest, "off")
            return
        allowed = choices_of(TrainConfig, "compile")
        if value is not None and value not in allowed:
            parser.error(f"argument --compile: expected {', '.join(allowed)}, got {value!r}")
        setattr(namespace, self.dest, "on" if value is None else value)


# ``--x`` / ``--no-x`` for every boolean setting.
BoolFlag = argparse.BooleanOptionalAction


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="settings from a run's config.json, or a sweep's best_config.json (a path or URL); flags "
                        "given here override it (default: none)")


def config_file(args: argparse.Namespace) -> dict:
    """The --config file's contents ({} without one)."""
    url = getattr(args, "config", None)
    if not url:
        return {}
    from mlc.io.config_json import load_config
    return load_config(url)


def from_file(args: argparse.Namespace, section: str) -> dict:
    """The ``section`` of the --config file, {} without one."""
    return dict(config_file(args).get(section) or {})


def given_or_file(args: argparse.Namespace, name: str, default, section: str | None = None):
    """A flag given on the command line, else the --config file's value (in ``section``, or at the top level),
    else ``default``."""
    if hasattr(args, name):
        return getattr(args, name)
    value = from_file(args, section).get(name) if section else config_file(args).get(name)
    return default if value is None else value


def add_log_args(p: argparse.ArgumentParser) -> None:
    """--quiet and --verbose, on every job (read by :func:`run_job`)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", action="store_true",
                   help="no progress: no bars, heartbeat or phase lines; the plan, resume, result and warnings "
                        "still print (default: off)")
    g.add_argument("--verbose", action="store_true",
                   help="debug lines too, and the traceback of an expected error (default: off)")


def run_job(main, parser: argparse.ArgumentParser, argv=None) -> None:
    """Parse the flags, set up the logs, run ``main(args)`` and exit: with its return value when it is an int,
    else 0. An expected failure (:mod:`mlc.errors`) prints ``error: <message>`` on stderr and exits with its
    kind's code, its traceback only with --verbose; anything else is a bug and keeps Python's traceback."""
    import traceback

    from mlc import errors, logs
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
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: getattr(args, k) for k in names if hasattr(args, k)}
    if given.get("refit"):  # a refit starts from its run's settings (mlc.train.refit)
        if getattr(args, "config", None):
            raise UsageError("--refit takes the settings of the run it refits; give flags to change some, not --config")
        from mlc.train.refit import settings
        saved = {k: v for k, v in settings(given["refit"]).items() if k in names}
    else:
        saved = {k: v for k, v in from_file(args, "train").items() if k in names}
    merged = {**saved, **given}
    base = DEMO_DEFAULTS if merged.get("data") is None else {}
    try:
        return TrainConfig(**{**base, **merged})
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
        # SUPPRESS: a flag absent from the namespace was not given, so a --config file may set it.
        if f.name == "num_workers":
            g.add_argument(flag, type=_workers, default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} (default: {default})")
        elif isinstance(default, bool):
            g.add_argument(flag, action=BoolFlag, default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} (default: {'on' if default else 'off'})")
        else:
            kind = _auto_float if f.name in ("gpus_per_worker", "cpus_per_worker") else type(default)
            g.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} (default: {default if default is not None else 'auto'})")


def _section(args: argparse.Namespace, cls, section: str) -> dict:
    """The fields of ``cls``: flags given, over the --config file's ``section``, over the defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    saved = {k: v for k, v in from_file(args, section).items() if k in names}
    merged = {**saved, **{k: getattr(args, k) for k in names if hasattr(args, k)}}
    if isinstance(merged.get("depths"), list):  # JSON has no tuples
        merged["depths"] = tuple(merged["depths"])
    return merged


def scale_from_args(args: argparse.Namespace) -> ScaleConfig:
    given = _section(args, ScaleConfig, "scale")
    try:
        return ScaleConfig(**given)
    except ValueError as e:
        raise UsageError(str(e)) from None


def name_list(text: str) -> tuple:
    """A flag's comma-separated names (``a,b``), at least one."""
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}")
    return names


def int_list(text: str) -> tuple:
    """A flag's comma-separated integers (``0,1,2``), at least one."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def _demo(name: str) -> str:
    return f"; demo: {','.join(DEMO_SWEEP[name])}" if name in DEMO_SWEEP else ""


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    d = SweepConfig()
    g = p.add_argument_group("sweep", "Trials at once: as many as the cluster holds once the autoscaler has added "
                             "every node its node types allow (the nodes up now when no autoscaler config is "
                             "readable), never more than --num-samples. " + RESOURCES)
    for f in dataclasses.fields(SweepConfig):
        default = getattr(d, f.name)
        if f.name == "depths":
            g.add_argument("--depths", type=int_list, default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} (default: {','.join(map(str, default))})")
        elif f.name in ("loss", "pos_weight", "asl_gamma_neg"):  # checked and converted by SweepConfig
            g.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} (default: {','.join(map(str, default))}{_demo(f.name)})")
        elif f.name == "inputs":
            g.add_argument("--inputs", type=name_list, default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} (default: {','.join(default)}{_demo(f.name)})")
        elif isinstance(default, bool):
            g.add_argument("--" + f.name.replace("_", "-"), action=BoolFlag, default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} (default: {'on' if default else 'off'})")
        else:
            kind = (_auto_float if f.name in ("gpus_per_worker", "cpus_per_worker")
                    else float if f.name in ("lr_min", "lr_max", "wait_timeout") else type(default))
            g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} (default: {default if default is not None else 'auto'})")


# On the demo set (no --data) a sweep's fixed inputs and loss are the demo's, as a training run's are, unless
# the sweep names its own: SweepConfig's defaults (auto, asl) would read the demo's generated captions and
# score 1.0, with the loss measured on captioned data rather than the demo's.
DEMO_SWEEP = {"inputs": (DEMO_DEFAULTS["inputs"],), "loss": (DEMO_DEFAULTS["loss"],)}


def sweep_from_args(args: argparse.Namespace, *, demo: bool = False) -> SweepConfig:
    given = _section(args, SweepConfig, "sweep")
    if demo:
        given = {**DEMO_SWEEP, **given}
    try:
        return SweepConfig(**given)
    except ValueError as e:
        raise UsageError(str(e)) from None


def data_or_demo(data: str | None) -> str:
    """``data``, or the embedded demo dataset's root when it is None (a job run without --data)."""
    if data is not None:
        return data
    from mlc.data.demo import make_demo_dataset
    return make_demo_dataset()
