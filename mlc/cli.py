"""Command-line flags shared by the jobs: one definition, so train, tune and predict cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import DEMO_DEFAULTS, TrainConfig

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
    "epochs": "total epochs (a rerun may raise it to train further)",
    "batch_size": "images per optimizer step",
    "lr": "peak learning rate (after warm-up; cosine decay to 0)",
    "weight_decay": "decoupled weight decay on conv/linear weights",
    "optimizer": "adamw or sgd (Nesterov)",
    "momentum": "SGD momentum",
    "warmup_epochs": "linear warm-up length in epochs (may be fractional)",
    "clip_grad": "maximum gradient norm; 0 turns clipping off",
    "amp": "mixed precision: auto (bf16 on GPUs and on CPUs with AMX, where it beats fp32), bf16, or off",
    "image_size": "training crop and evaluation centre-crop size in pixels",
    "val_fraction": "fraction of train.csv held out for validation (a seeded split by ImageID)",
    "seed": "seed of the split, the initialisation, the data order and the augmentations",
    "num_workers": "DataLoader worker processes",
    "max_bad_fraction": "stop when more than this fraction of labelled images is unreadable",
    "max_image_pixels": "refuse images with more pixels than this (decompression bombs)",
}


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and output")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("optimizer", "amp"):
            choices = {"optimizer": ["adamw", "sgd"], "amp": ["auto", "bf16", "off"]}[f.name]
        else:
            choices = None
        default = getattr(D, f.name)
        kind = type(default) if default is not None else str
        shown = f"default: {default}" + (f"; demo: {DEMO_DEFAULTS[f.name]}" if f.name in DEMO_DEFAULTS else "")
        # SUPPRESS: only flags the user gave reach the namespace, so the demo defaults can fill the rest.
        g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=argparse.SUPPRESS, choices=choices,
                       help=f"{HELP[f.name]} ({shown})")
    p.add_argument("--fresh", action="store_true", help="ignore and remove an existing checkpoint in --output and "
                   "start over (default: resume from it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The flags given, on top of the demo defaults when --data is absent, else the normal defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    base = DEMO_DEFAULTS if given.get("data") is None else {}
    try:
        return TrainConfig(**{**base, **given})
    except ValueError as e:
        sys.exit(f"error: {e}")
