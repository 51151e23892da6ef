"""Prediction: scores for a list of ImageIDs, and the Kaggle submission + probabilities files."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import torch

from . import storage
from .checkpoint import load_model_checkpoint
from .config import TrainConfig
from .data import DataPaths, ImageTable, image_urls, make_loader
from .engine import predict_scores, resolve_loader_workers
from .precision import pick_amp_dtype
from .labels import LabelVocab
from .thresholds import ThresholdChoice
from .model import build_model, fold_batchnorm
from .table import read_ids, submission_csv
from .transforms import eval_transform


def pick_device() -> torch.device:
    """This process's device when it is not a Ray worker: the first GPU, else the CPU. (Ray workers take
    theirs from the GPUs Ray assigned them: see mlc.ray_predict.)"""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def prepare_device(device: torch.device) -> None:
    """Per-process settings for scoring on ``device``: the input shapes are fixed, so let cuDNN time its
    convolution algorithms once and keep the fastest."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def available_cpus() -> int:
    """CPUs this process may run on (its affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def score_ids(model, ids, images_root: str, *, image_size: int, device, amp_dtype, batch_size: int,
              num_workers: int, max_pixels: int, log=print, progress: bool = True) -> dict:
    """Scores for every ImageID in order; an unreadable image keeps its row (NaN scores) and is warned about."""
    ds = ImageTable(image_urls(images_root, ids), None, eval_transform(image_size), max_pixels)
    loader = make_loader(ds, batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    out = predict_scores(model, loader, device, amp_dtype=amp_dtype, progress=progress, desc="predict")
    for s in out["skipped"]:
        log(f"warning: cannot read {s.name} ({s.reason}); its row is written with no labels")
    return out


def write_predictions(output: str, ids, probs: np.ndarray, ok: np.ndarray, vocab: LabelVocab,
                      choice: ThresholdChoice, *, prefix: str = "", truth: np.ndarray | None = None) -> dict:
    """Write ``<prefix>predictions.csv`` (Kaggle format, original label strings, input order) and
    ``<prefix>probabilities.csv`` (with ``true_<label>`` columns when ``truth`` is given)."""
    ids = list(ids)
    decided = choice.apply(np.nan_to_num(probs, nan=0.0))
    decided[~ok] = False
    storage.write_text(storage.join(output, prefix + "predictions.csv"), submission_csv(ids, vocab.decode(decided)))
    table = pd.DataFrame(probs, columns=vocab.labels)
    table.insert(0, "ImageID", ids)
    if truth is not None:
        table = pd.concat([table, pd.DataFrame(truth.astype(np.int8), columns=[f"true_{c}" for c in vocab.labels])],
                          axis=1)
    buf = io.StringIO()
    table.to_csv(buf, index=False, float_format="%.6f")  # NaN (unreadable image) is written as an empty cell
    storage.write_text(storage.join(output, prefix + "probabilities.csv"), buf.getvalue())
    return {"rows": len(ids), "unreadable": [i for i, good in zip(ids, ok) if not good],
            "empty_predictions": int((~decided.any(axis=1)).sum())}


def predict_from_checkpoint(checkpoint: str, data: str | None, output: str, *, ids_csv: str | None = None,
                            images: str | None = None, batch_size: int = 64, num_workers: int = 0,
                            loader_workers: int | None = None, gpus_per_worker: float | None = None,
                            cpus_per_worker: float | None = None, log=print, progress: bool = True) -> dict:
    """Predict test.csv (or any table with an ImageID column) with label vocabulary, image size and
    threshold taken from the checkpoint alone.

    ``num_workers`` 0 scores in this process (``loader_workers`` DataLoader processes read the images);
    ``num_workers`` N >= 1 spreads the rows over N Ray Data actors on the cluster in RAY_ADDRESS (or a
    local Ray), each with ``gpus_per_worker`` GPUs (default: 1 when the cluster has GPUs, else 0).
    Without ``images`` the image folder is the one the checkpoint was trained with, resolved against
    ``data`` (default: the checkpoint's dataset root).
    """
    if num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {num_workers}")
    state, vocab, meta = load_model_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(meta["config"])
    if meta.get("threshold") is None:
        raise ValueError(f"{checkpoint}: holds no threshold (it predates its first validation); use best/")
    choice = ThresholdChoice.from_dict(meta["threshold"])
    data = data or cfg.data
    if data is None:
        raise ValueError(f"{checkpoint}: its config names no dataset root; pass --data")
    paths = DataPaths.resolve(data, images=images if images is not None else cfg.images, test_csv=ids_csv)
    ids = read_ids(paths.test_csv)
    storage.check_writable(output)
    log(f"predicting {len(ids)} images from {paths.test_csv} (images in {paths.images}) with {checkpoint} "
        f"({len(vocab)} labels, {cfg.image_size}px, threshold {choice.strategy})")
    if num_workers >= 1:
        from .ray_predict import score_distributed  # Ray is imported only on this path
        out = score_distributed(state, ids, paths.images, cfg, len(vocab), num_workers=num_workers,
                                gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                                batch_size=batch_size, log=log, progress=progress)
    else:
        model = fold_batchnorm(build_model(len(vocab), cfg.unfrozen_depth, cfg.dropout, weights=state))
        device = pick_device()
        prepare_device(device)
        model.to(device, memory_format=torch.channels_last)
        amp_dtype = pick_amp_dtype(cfg.amp, device, kind="predict", unfrozen_depth=cfg.unfrozen_depth,
                                   image_size=cfg.image_size, log=log)
        out = score_ids(model, ids, paths.images, image_size=cfg.image_size, device=device, amp_dtype=amp_dtype,
                        batch_size=batch_size,
                        num_workers=resolve_loader_workers(loader_workers, available_cpus(), device),
                        max_pixels=cfg.max_image_pixels, log=log, progress=progress)
    summary = write_predictions(output, ids, out["probs"], out["ok"], vocab, choice)
    summary.update(seconds=out["seconds"], img_per_s=out["img_per_s"])
    log(f"wrote {storage.join(output, 'predictions.csv')} ({summary['rows']} rows, "
        f"{len(summary['unreadable'])} unreadable images)")
    return summary
