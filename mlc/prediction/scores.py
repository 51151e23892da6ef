"""Scores in this process: one pass of a network over a loader's batches (:func:`predict_scores`, which validation
uses too), and the scores of a list of ImageIDs with a model built from a checkpoint's weights
(:func:`score_ids`, :func:`score_here`)."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from mlc.config import uses_images
from mlc.data.loader import make_loader, resolve_loader_workers
from mlc.data.run_data import image_urls
from mlc.data.pack_source import PackedImages, PackedTable
from mlc.data.sources import RowSource, StreamTable
from mlc.data.tokenizer import Tokenizer, encode_rows
from mlc.data.transforms import eval_transform
from mlc.logs import progress as progress_bar
from mlc.model.device import available_cpus, pick_device, prepare_device
from mlc.model.fusion import build, for_scoring, head
from mlc.model.precision import NAMES, autocast, pick_amp_dtype


@torch.inference_mode()
def predict_scores(model, batches, device, *, n_rows: int, amp_dtype=None, progress: bool = True,
                   desc: str = "score", pad_to: int | None = None) -> dict:
    """Sigmoid scores for every row of a table of ``n_rows`` that ``batches`` (:class:`mlc.data.batch.Batch`)
    hold.

    ``pad_to``: a smaller batch (the last) is padded with blank rows to this many, whose scores are dropped:
    with cuDNN timing its algorithms per input shape, one more shape costs a round of timing every conv.

    Returns ``probs`` (n_rows, C) with NaN rows for images that could not be read (or that another rank
    scored), ``ok`` (bool mask of scored rows), ``loss`` (mean BCE over scored rows, NaN without targets), the
    ``skipped`` rows, ``seconds`` and ``img_per_s``. Scores stay on the device until the pass ends: one copy
    back, no wait per batch.
    """
    model.eval()
    parts, where, skipped = [], [], []
    loss_sum = torch.zeros((), device=device)
    seen = labelled = 0
    start = time.perf_counter()
    for batch in progress_bar(batches, desc=desc, enabled=progress):
        skipped.extend(batch.skipped)
        if not len(batch):
            continue
        with autocast(device, amp_dtype):
            logits = model(*pad_rows(batch.inputs(device), pad_to)).float()[:len(batch)]
        parts.append(torch.sigmoid(logits))
        where.append(batch.index)
        if batch.targets.shape[1]:
            y = batch.targets_on(device)
            loss_sum += F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / y.shape[1]
            labelled += len(batch)
        seen += len(batch)
    probs = np.full((n_rows, parts[0].shape[1] if parts else head(model).out_features), np.nan, dtype=np.float32)
    ok = np.zeros(n_rows, dtype=bool)
    if parts:
        idx = torch.cat(where).numpy()
        probs[idx] = torch.cat(parts).cpu().numpy()
        ok[idx] = True
    elapsed = time.perf_counter() - start
    return {"probs": probs, "ok": ok, "loss": float(loss_sum.item()) / labelled if labelled else math.nan,
            "skipped": skipped, "seconds": elapsed, "img_per_s": seen / elapsed if elapsed > 0 else 0.0}


def pad_rows(inputs: tuple, n: int | None) -> tuple:
    """Model inputs (:meth:`mlc.data.batch.Batch.inputs`) with blank rows appended up to ``n`` rows: zero
    images, empty caption bags."""
    rows = len(inputs[1]) if inputs[0].dim() == 1 else len(inputs[0])  # (ids, offsets) or (x, ...)
    if n is None or rows >= n:
        return inputs
    out = list(inputs)
    if inputs[0].dim() == 4:
        x = inputs[0]
        out[0] = torch.cat([x, x.new_zeros((n - rows, *x.shape[1:]))]).contiguous(memory_format=torch.channels_last)
    if inputs[-1].dim() == 1 and len(inputs) >= 2 and inputs[-2].dim() == 1:  # caption bags: (ids, offsets) last
        ids, offsets = inputs[-2], inputs[-1]
        out[-1] = torch.cat([offsets, offsets.new_full((n - rows,), len(ids))])
    return tuple(out)


def row_source(images, ids, transform, max_pixels: int, captions=None, read_images: bool = True) -> RowSource:
    """The source of the rows ``ids`` to score: their files in the folder ``images`` (a URL), or their rows in a
    pack (``images`` a :class:`mlc.data.pack_source.PackedImages`)."""
    if isinstance(images, PackedImages):
        return PackedTable(images, None, transform, captions=captions, read_images=read_images)
    return StreamTable(image_urls(images, ids), None, transform, max_pixels, captions=captions, read_images=read_images)


def score_ids(model, ids, images, *, image_size: int, device, amp_dtype, batch_size: int,
              num_workers: int, max_pixels: int, log=print, progress: bool = True, captions=None,
              tokenizer: Tokenizer | None = None, read_images: bool = True) -> dict:
    """Scores for every ImageID in order (images in the folder or pack ``images``: :func:`row_source`); an
    unreadable image keeps its row (NaN scores) and is warned about. With a ``tokenizer`` each row's caption
    (``captions``, None for a row without one) goes in too."""
    tokens = encode_rows(tokenizer, captions, len(ids), log) if tokenizer is not None else None
    source = row_source(images, ids, eval_transform(image_size), max_pixels, captions=tokens, read_images=read_images)
    loader = make_loader(source, batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    out = predict_scores(model, loader, device, n_rows=len(ids), amp_dtype=amp_dtype, progress=progress,
                         desc="predict")
    for s in out["skipped"]:
        log(f"warning: cannot read {s.name} ({s.reason}); its row is written with no labels")
    return out


def scoring_model(state: dict, num_classes: int, cfg, tokenizer: Tokenizer | None, device, amp_dtype):
    """The network ``cfg`` describes with ``state``'s weights on ``device``, BatchNorm folded for scoring, with
    ``cfg.tta``'s test-time augmentation."""
    model = for_scoring(build(cfg.inputs, num_classes, model=cfg.model, num_tokens=tokenizer.size if tokenizer else 0,
                              unfrozen_depth=cfg.unfrozen_depth, dropout=cfg.dropout, weights=state,
                              freeze_bn=cfg.freeze_bn), amp_dtype, cfg.tta)
    return model.to(device, memory_format=torch.channels_last)  # as its inputs are: no layout change per call


def score_here(state: dict, num_classes: int, cfg, ids, images, *, batch_size: int,
               loader_workers: int | None, device=None, log=print, progress: bool = True, captions=None,
               tokenizer: Tokenizer | None = None) -> dict:
    """:func:`score_ids` with the model ``cfg`` describes, built from ``state`` on ``device`` (default: this
    process's, :func:`mlc.model.device.pick_device`), precision and loader workers decided here.
    Adds ``device`` and ``precision`` (its name) to what :func:`score_ids` returns."""
    device = device or pick_device()
    prepare_device(device)
    amp_dtype = pick_amp_dtype(cfg.amp, device, kind="predict", unfrozen_depth=cfg.unfrozen_depth,
                               image_size=cfg.image_size, log=log)
    model = scoring_model(state, num_classes, cfg, tokenizer, device, amp_dtype)
    cpus = available_cpus()
    workers = resolve_loader_workers(loader_workers, cpus, device)
    # Decided here, where the images are scored, and said here (the machine that parsed the flags may differ).
    log(f"scoring on {device}, precision {NAMES[amp_dtype]}, {workers} loader workers ({cpus} CPUs), "
        f"batches of {batch_size}")
    out = score_ids(model, ids, images, image_size=cfg.image_size, device=device, amp_dtype=amp_dtype,
                    batch_size=batch_size, num_workers=workers, max_pixels=cfg.max_image_pixels, log=log,
                    progress=progress, captions=captions, tokenizer=tokenizer, read_images=uses_images(cfg.inputs))
    return {**out, "device": device, "precision": NAMES[amp_dtype]}
