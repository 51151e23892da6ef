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
    "batch_size": "images per optimizer step; in a Ray run global: summed over all workers, dealt out to them "
                  "(uneven shares when they do not divide it), so the data order and the learning-rate schedule "
                  "are the same at any --num-workers, also after an elastic resize or a resume on fewer workers",
    "lr": "peak learning rate (after warm-up; cosine decay to 0)",
    "weight_decay": "decoupled weight decay on conv/linear weights",
    "optimizer": "adamw or sgd (Nesterov)",
    "momentum": "SGD momentum",
    "warmup_epochs": "linear warm-up length in epochs (may be fractional)",
    "clip_grad": "maximum gradient norm; 0 turns clipping off",
    "amp": "mixed precision: auto (GPU: bf16 on sm80+, fp16 with loss scaling below; CPU: bf16 or fp32, whichever a "
           "short timed probe finds faster, cached per machine), bf16, fp16, or off",
    "compile": "torch.compile the training model (true/false); measured not to pay on a 2-core CPU, unmeasured "
               "on GPUs, where jobs/bench.py --gpu measures it",
    "image_size": "training crop and evaluation centre-crop size in pixels",
    "val_fraction": "fraction of train.csv held out for validation (a seeded split by ImageID)",
    "seed": "seed of the split, the initialisation, the data order and the augmentations",
    "loader_workers": "DataLoader worker processes per training process; default: chosen where the process runs, "
                      "from the CPUs it may use (Ray's reservation per worker, or this process's CPU affinity)",
    "gpu_decode": "decode JPEGs on the GPU (nvJPEG) instead of in the loader workers, for nodes whose CPUs "
                  "cannot keep up (true/false); other formats still decode on the CPU",
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
# Said in the help of both jobs that train on Ray: the batch and the schedule do not depend on the world size.
RESOURCES = ("--gpus-per-worker: default 1 when the node types the cluster can provide (the autoscaler's, or the nodes "
             "up) have GPUs, else 0; only 0 or whole GPUs for training (two ranks on one GPU fail in NCCL). "
             "--cpus-per-worker: default 8 per GPU, capped by the GPU node type's CPUs per GPU; 1 for CPU workers")
SCALE_HELP = {
    "num_workers": "Ray Train workers (one process each, one per GPU on GPUs): N, or MIN-MAX for an elastic group that "
                   "starts with what fits (at least MIN), grows as nodes arrive and, when nodes are lost, continues "
                   "from the latest checkpoint on fewer (each shrink is one of --max-failures)",
    "gpus_per_worker": "GPUs per worker: 0 (CPU workers on gloo) or a whole number (NCCL); default: 1 when the "
                       "cluster's node types have GPUs, else 0",
    "cpus_per_worker": "CPUs Ray reserves per worker, from which its DataLoader processes are sized; default: 8 per "
                       "GPU capped by the GPU node type's CPUs per GPU, 1 for CPU workers",
    "max_failures": "worker-group failures (a lost Spot node included) recovered from the latest checkpoint before "
                    "the run fails; -1: no limit",
    "name": "stable run name: outputs and checkpoints go under --output/NAME/, and a rerun with the same name resumes",
    "keep_checkpoints": "checkpoints kept by validation F1 in the run folder (Ray Train also always keeps the latest)",
    "wait_for_autoscaler": "wait for nodes even when no autoscaler config is readable here (an autoscaler this process "
                           "cannot see, e.g. KubeRay's, will add them); with one readable, waiting is automatic",
    "wait_timeout": "seconds to wait for the autoscaler to add the first workers' nodes before giving up",
    "resize_check_s": "elastic groups: seconds between Ray Train's checks for room to grow",
}


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
            g.add_argument(flag, type=_workers, default=default, help=f"{SCALE_HELP[f.name]} (default: {default})")
        elif isinstance(default, bool):
            g.add_argument(flag, action="store_true", help=SCALE_HELP[f.name])
        else:
            kind = _auto_float if f.name in ("gpus_per_worker", "cpus_per_worker") else type(default)
            g.add_argument(flag, type=kind, default=default,
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
    "gpus_per_worker": SCALE_HELP["gpus_per_worker"],
    "cpus_per_worker": SCALE_HELP["cpus_per_worker"],
    "max_epochs": "epochs of a trial that ASHA never stops",
    "grace_epochs": "epochs every trial runs before ASHA may stop it",
    "reduction_factor": "ASHA keeps the best 1/FACTOR of trials at each rung",
    "lr_min": "lowest peak learning rate (log-uniform range)",
    "lr_max": "highest peak learning rate (equal to --lr-min: a fixed rate)",
    "depths": "unfrozen depths to sample from, comma-separated, each 0..4",
    "max_failures": "worker-group restarts per trial from its latest checkpoint (a lost Spot node included)",
    "search_seed": "seed of the random search",
    "wait_for_autoscaler": SCALE_HELP["wait_for_autoscaler"],
    "wait_timeout": "seconds to wait for the autoscaler to add the first trial's nodes before giving up",
}


def _int_list(text: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    from .tune import SweepConfig
    d = SweepConfig()
    g = p.add_argument_group("sweep", "Trials at once: as many as the cluster holds once the autoscaler has added "
                             "every node its node types allow (the nodes up now when no autoscaler config is "
                             "readable), never more than --num-samples. " + RESOURCES)
    for f in dataclasses.fields(SweepConfig):
        default = getattr(d, f.name)
        if f.name == "depths":
            g.add_argument("--depths", type=_int_list, default=default,
                           help=f"{SWEEP_HELP[f.name]} (default: {','.join(map(str, default))})")
        elif isinstance(default, bool):
            g.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=SWEEP_HELP[f.name])
        else:
            kind = (_auto_float if f.name in ("gpus_per_worker", "cpus_per_worker")
                    else float if f.name in ("lr_min", "lr_max", "wait_timeout") else type(default))
            g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                           help=f"{SWEEP_HELP[f.name]} (default: {default if default is not None else 'auto'})")


def sweep_from_args(args: argparse.Namespace):
    from .tune import SweepConfig
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SweepConfig) if hasattr(args, f.name)}
    try:
        return SweepConfig(**given)
    except ValueError as e:
        sys.exit(f"error: {e}")
