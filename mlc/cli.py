"""Command-line flags shared by the jobs: one definition, so train, tune and predict cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import DEMO_DEFAULTS, ScaleConfig, TrainConfig

D = TrainConfig()

HELP = {
    "data": "dataset root URL (local path, file://, gs://bucket/prefix, memory://...) holding train.csv, test.csv "
            "and data/<ImageID>; omit it to use the embedded demo dataset (generated offline into ~/.cache/mlc)",
    "output": "where the run writes checkpoint/, best/, metrics.json, predictions.csv, probabilities.csv, plots/",
    "images": "image folder, inside --data when relative (e.g. images); default <data>/data",
    "train_csv": "labelled table (ImageID,Labels,Caption), a path or URL; default <data>/train.csv",
    "test_csv": "table to predict (ImageID[,Caption]), a path or URL; default <data>/test.csv",
    "weights": "initial weights: imagenet (torchvision IMAGENET1K_V2, downloaded to torchvision's cache), "
               "none (random init), or a path/URL to a state dict",
    "unfrozen_depth": "how many of the last residual stages train: 0 = head only, 1 = layer4 + head (the report), "
                      "2, 3, and 4 = every stage including the stem (conv1/bn1); frozen stages keep BatchNorm in "
                      "eval mode",
    "dropout": "dropout where the frozen features enter the trainable part (none at depth 4, where nothing is frozen)",
    "freeze_bn": "keep every BatchNorm layer in eval mode (pretrained running statistics, no batch statistics); "
                 "true/false",
    "epochs": "total epochs (a rerun may raise it to train further)",
    "batch_size": "images per optimizer step",
    "lr": "peak learning rate (after warm-up; cosine decay to 0)",
    "weight_decay": "decoupled weight decay on conv/linear weights",
    "optimizer": "adamw or sgd (Nesterov)",
    "momentum": "SGD momentum",
    "warmup_epochs": "linear warm-up length in epochs (may be fractional)",
    "clip_grad": "maximum gradient norm; 0 turns clipping off",
    "amp": "mixed precision: auto (GPU: bf16 on sm80+, fp16 with loss scaling below; CPU: bf16 or fp32, whichever a "
           "short timed probe finds faster, cached per machine), bf16, fp16, or off",
    "image_size": "training crop and evaluation centre-crop size in pixels",
    "val_fraction": "fraction of train.csv held out for validation (a seeded split by ImageID)",
    "seed": "seed of the split, the initialisation, the data order and the augmentations",
    "loader_workers": "DataLoader worker processes per training process; default: chosen where the process runs, "
                      "from the CPUs it may use (Ray's reservation per worker, or this process's CPU affinity)",
    "max_bad_fraction": "stop when more than this fraction of labelled images is unreadable",
    "max_image_pixels": "refuse images with more pixels than this (decompression bombs)",
}


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
                       help=f"{HELP[f.name]} ({shown})")
    p.add_argument("--fresh", action="store_true", help="ignore and remove an existing checkpoint in --output and "
                   "start over (default: resume from it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The flags given, on top of the demo defaults when --data is absent, else the normal defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    base = DEMO_DEFAULTS if given.get("data") is None else {}
    try:
        return TrainConfig(**{**base, **given})
    except ValueError as e:
        sys.exit(f"error: {e}")


S = ScaleConfig()
SCALE_HELP = {
    "num_workers": "Ray Train workers (processes, one per GPU when GPUs are used)",
    "gpus_per_worker": "GPUs per worker; default: 1 when the cluster has GPUs (NCCL), else 0 (CPU workers on gloo)",
    "cpus_per_worker": "CPUs Ray reserves per worker (its DataLoader processes come on top)",
    "max_failures": "worker-group failures recovered from the latest checkpoint before the run fails; -1: no limit",
    "name": "stable run name: outputs and checkpoints go under --output/NAME/, and a rerun with the same name resumes",
    "keep_checkpoints": "checkpoints kept in the run folder (the best by validation F1 and the latest always are)",
}


def add_scale_args(p: argparse.ArgumentParser, skip=()) -> None:
    g = p.add_argument_group("Ray cluster (ignored with --local)")
    for f in dataclasses.fields(ScaleConfig):
        if f.name in skip:
            continue
        default = getattr(S, f.name)
        kind = float if f.name in ("gpus_per_worker", "cpus_per_worker") else type(default)
        g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                       help=f"{SCALE_HELP[f.name]} (default: {default if default is not None else 'auto'})")


def scale_from_args(args: argparse.Namespace) -> ScaleConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ScaleConfig) if hasattr(args, f.name)}
    try:
        return ScaleConfig(**given)
    except ValueError as e:
        sys.exit(f"error: {e}")


SWEEP_HELP = {
    "name": "stable sweep name: everything goes under --output/NAME/, and a rerun with the same name resumes",
    "num_samples": "trials to run",
    "workers_per_trial": "Ray Train workers per trial (each one GPU when the cluster has GPUs)",
    "gpus_per_worker": "GPUs per worker; default: 1 when the cluster has GPUs, else 0",
    "cpus_per_worker": "CPUs Ray reserves per worker",
    "max_epochs": "epochs of a trial that ASHA never stops",
    "grace_epochs": "epochs every trial runs before ASHA may stop it",
    "reduction_factor": "ASHA keeps the best 1/FACTOR of trials at each rung",
    "lr_min": "lowest peak learning rate (log-uniform range)",
    "lr_max": "highest peak learning rate (equal to --lr-min: a fixed rate)",
    "depths": "unfrozen depths to sample from, comma-separated, each 0..4",
    "max_failures": "worker-group restarts per trial from its latest checkpoint",
    "search_seed": "seed of the random search",
    "wait_for_autoscaler": "let trials wait for nodes an autoscaler will add, instead of failing at start",
}


def _int_list(text: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    from .tune import SweepConfig
    d = SweepConfig()
    g = p.add_argument_group("sweep")
    for f in dataclasses.fields(SweepConfig):
        default = getattr(d, f.name)
        if f.name == "depths":
            g.add_argument("--depths", type=_int_list, default=default,
                           help=f"{SWEEP_HELP[f.name]} (default: {','.join(map(str, default))})")
        elif isinstance(default, bool):
            g.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=SWEEP_HELP[f.name])
        else:
            kind = float if f.name in ("gpus_per_worker", "cpus_per_worker", "lr_min", "lr_max") else type(default)
            g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                           help=f"{SWEEP_HELP[f.name]} (default: {default if default is not None else 'auto'})")


def sweep_from_args(args: argparse.Namespace):
    from .tune import SweepConfig
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SweepConfig) if hasattr(args, f.name)}
    try:
        return SweepConfig(**given)
    except ValueError as e:
        sys.exit(f"error: {e}")
