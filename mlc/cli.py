"""Command-line flags shared by the jobs: one definition, so train, tune and predict cannot drift apart.

Every flag is a field of a config class in :mod:`mlc.config`; its help text is that field's ``metadata["help"]``."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from mlc.config import DEMO_DEFAULTS, ScaleConfig, SweepConfig, TrainConfig
from mlc.errors import UsageError

D = TrainConfig()

def add_train_args(p: argparse.ArgumentParser, skip=()) -> None:
    g = p.add_argument_group("data, model and training")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        choices = {"optimizer": ["adamw", "sgd"], "amp": ["auto", "bf16", "fp16", "off"],
                   "store": ["auto", "memory", "disk", "off"]}.get(f.name)
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
        if f.name == "compile":  # --compile alone and --no-compile, as when it was a switch
            g.add_argument("--compile", "--no-compile", action=CompileFlag, default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']}; --compile alone is on, --no-compile off ({shown})")
            continue
        g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=argparse.SUPPRESS, choices=choices,
                       help=f"{f.metadata['help']} ({shown})")
    accept_old_bool_values(p)
    p.add_argument("--fresh", action="store_true", help="start over: the previous run in --output is replaced once "
                   "every check before training has passed (tables, images, flags, weights), never before "
                   "(default: resume from its checkpoint)")


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _auto_int(text: str):
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def _compile_value(text: str) -> str:
    """auto, on or off; the switch's old value spellings (true/false, yes/no, 1/0) still mean on and off."""
    t = text.strip().lower()
    if t in ("auto", "on", "off"):
        return t
    try:
        return "on" if _bool(t) else "off"
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}") from None


class CompileFlag(argparse.Action):
    """``--compile [auto|on|off]`` (alone: on) and ``--no-compile`` (off): the setting was a switch before it had
    auto, and both spellings keep working."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", metavar="auto|on|off", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string == "--no-compile":
            if value is not None:
                parser.error(f"argument --no-compile: takes no value, got {value!r}")
            setattr(namespace, self.dest, "off")
            return
        try:
            setattr(namespace, self.dest, "on" if value is None else _compile_value(value))
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument --compile: {e}")


# ``--x`` / ``--no-x`` for every boolean setting.
BoolFlag = argparse.BooleanOptionalAction
_BOOL_WORDS = ("1", "true", "yes", "on", "0", "false", "no", "off")


def accept_old_bool_values(p: argparse.ArgumentParser) -> None:
    """Let ``p`` still parse the value spelling documented before (``--freeze-bn true|false``, also
    ``--freeze-bn=false``) for one release: rewritten to ``--freeze-bn`` / ``--no-freeze-bn`` with a deprecation
    warning before argparse sees it, so ``--help`` shows only the new form."""
    if getattr(p, "_mlc_old_bools", False):
        return
    p._mlc_old_bools = True
    inner = p.parse_known_args

    def parse_known_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        flags = {o for a in p._actions if isinstance(a, BoolFlag) for o in a.option_strings
                 if not o.startswith("--no-")}
        out, i = [], 0
        while i < len(args):
            flag, eq, value = args[i].partition("=")
            if flag in flags and not eq and i + 1 < len(args) and args[i + 1].strip().lower() in _BOOL_WORDS:
                value, eq = args[i + 1], "="
                i += 1
            if flag in flags and eq:
                try:
                    on = _bool(value)
                except argparse.ArgumentTypeError as e:
                    p.error(f"argument {flag}: {e}")
                new = flag if on else "--no-" + flag[2:]
                print(f"warning: {flag} {value} is deprecated and goes in the next release; use {new}", file=sys.stderr)
                out.append(new)
            else:
                out.append(args[i])
            i += 1
        return inner(out, namespace)

    p.parse_known_args = parse_known_args


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="settings from a run's config.json, or a sweep's best_config.json (a path or URL); flags "
                        "given here override it (default: none)")


def config_file(args: argparse.Namespace) -> dict:
    """The --config file's contents ({} without one)."""
    url = getattr(args, "config", None)
    if not url:
        return {}
    from mlc.train.replay import load_config
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
    accept_old_bool_values(p)
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


def _int_list(text: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    accept_old_bool_values(p)
    d = SweepConfig()
    g = p.add_argument_group("sweep", "Trials at once: as many as the cluster holds once the autoscaler has added "
                             "every node its node types allow (the nodes up now when no autoscaler config is "
                             "readable), never more than --num-samples. " + RESOURCES)
    for f in dataclasses.fields(SweepConfig):
        default = getattr(d, f.name)
        if f.name == "depths":
            g.add_argument("--depths", type=_int_list, default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} (default: {','.join(map(str, default))})")
        elif f.name == "inputs":
            g.add_argument("--inputs", type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()),
                           default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {','.join(default)})")
        elif isinstance(default, bool):
            g.add_argument("--" + f.name.replace("_", "-"), action=BoolFlag, default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} (default: {'on' if default else 'off'})")
        else:
            kind = (_auto_float if f.name in ("gpus_per_worker", "cpus_per_worker")
                    else float if f.name in ("lr_min", "lr_max", "wait_timeout") else type(default))
            g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} (default: {default if default is not None else 'auto'})")


def sweep_from_args(args: argparse.Namespace) -> SweepConfig:
    given = _section(args, SweepConfig, "sweep")
    try:
        return SweepConfig(**given)
    except ValueError as e:
        raise UsageError(str(e)) from None
