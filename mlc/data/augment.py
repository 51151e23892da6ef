"""Crops, resizes and flips of a whole batch on the device, for images read from the decode-once store
(:mod:`mlc.data.store`).

A stored image keeps its aspect ratio: it is shrunk (never enlarged) until both sides fit the slot, whose side
is :func:`slot_side`. Each row's crop box is drawn from the same distribution as the CPU path's
``RandomResizedCrop`` and flip, on the image's original size, from the row's own seed (so any rank or thread
draws the same box for it), vectorised over the batch, and scaled onto the stored pixels; evaluation's box is
the centre crop of ``Resize(size / 0.875)``. The device then cuts and resizes every box of the batch in one
``roi_align`` call, flips and normalises (:func:`mlc.data.transforms.crop_batch`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mlc.data.transforms import EVAL_CROP_RATIO

# The slot holds evaluation's resize (size / 0.875, 256 px at 224) along an image's shorter side for images up
# to 5:4, and whole COMP5329 images (longest side <= 320 px) at 224 without any resize: 320 = 256 x 1.25.
SLOT_ASPECT = 1.25


def slot_side(image_size: int) -> int:
    """The store's slot side for ``--image-size`` (a multiple of 16): 320 at 224, 96 at 64."""
    return int(math.ceil(image_size / EVAL_CROP_RATIO * SLOT_ASPECT / 16) * 16)


def fit_to_slot(img, side: int) -> np.ndarray:
    """A decoded RGB PIL image as (h, w, 3) uint8, shrunk to fit ``side`` x ``side`` when larger."""
    from PIL import Image
    w, h = img.size
    if max(w, h) > side:
        scale = side / max(w, h)
        img = img.resize((max(1, min(side, round(w * scale))), max(1, min(side, round(h * scale)))),
                         Image.BILINEAR, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)


def _uniforms(seeds: np.ndarray, n: int) -> np.ndarray:
    """``n`` uniform draws in [0, 1) per row, a function of the row's seed alone: the first ``n`` outputs of
    splitmix64 seeded with it, for every row at once (no generator object, no lock, no per-row Python)."""
    with np.errstate(over="ignore"):
        golden = np.uint64(0x9E3779B97F4A7C15)
        x = seeds.astype(np.uint64)[:, None] + np.arange(1, n + 1, dtype=np.uint64)[None] * golden
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def random_boxes(height: np.ndarray, width: np.ndarray, seeds: np.ndarray, scale, ratio) -> tuple:
    """``RandomResizedCrop``'s boxes and ``RandomHorizontalFlip``'s coin for a batch of rows: the same
    distribution as torchvision's (ten tries of an area in ``scale`` and a log-uniform aspect in ``ratio``, the
    first that fits; else a centre crop of the nearest allowed aspect), drawn per row from its seed.
    Returns (left, top, width, height, flip) arrays in original pixels."""
    h0, w0 = height.astype(np.float64), width.astype(np.float64)
    u = _uniforms(seeds, 23)
    target = (h0 * w0)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[:, :10])
    lo, hi = np.log(ratio[0]), np.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * u[:, 10:20])
    w, h = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= w0[:, None]) & (h > 0) & (h <= h0[:, None])
    k, found, rows = fits.argmax(1), fits.any(1), np.arange(len(h0))
    in_ratio = w0 / h0
    fw = np.where(in_ratio > max(ratio), np.round(h0 * max(ratio)), w0)
    fh = np.where(in_ratio < min(ratio), np.round(w0 / min(ratio)), h0)
    cw, ch = np.where(found, w[rows, k], fw), np.where(found, h[rows, k], fh)
    top = np.where(found, np.floor(u[:, 20] * (h0 - ch + 1)), (h0 - ch) // 2)
    left = np.where(found, np.floor(u[:, 21] * (w0 - cw + 1)), (w0 - cw) // 2)
    return left, top, cw, ch, u[:, 22] < 0.5


def eval_boxes(height: np.ndarray, width: np.ndarray, size: int) -> tuple:
    """Evaluation's crop (``ResizeCenterCrop(size / 0.875, size)``) as boxes (x1, y1, x2, y2) on the originals."""
    resize = int(round(size / EVAL_CROP_RATIO))
    h, w = height.astype(np.float64), width.astype(np.float64)
    portrait = w <= h
    # torchvision's Resize(int): the shorter side becomes ``resize``, the longer is truncated to an int.
    nw = np.where(portrait, resize, np.floor(resize * w / h))
    nh = np.where(portrait, np.floor(resize * h / w), resize)
    top, left = np.round((nh - size) / 2.0), np.round((nw - size) / 2.0)
    sx, sy = w / nw, h / nh
    return left * sx, top * sy, np.minimum(w, (left + size) * sx), np.minimum(h, (top + size) * sy)


def geometry(transform, meta, seeds) -> np.ndarray:
    """``[x1, y1, x2, y2, flip, size]`` per stored row (n, 6): its crop box on the stored pixels, whether it flips,
    and the output side. ``meta`` is the store's (stored h, stored w, original h, original w) per row; ``seeds``
    each row's augmentation seed (as :class:`mlc.data.sources.RowSource` seeds the CPU path), or None: drawn
    from torch's generator."""
    meta = np.asarray(meta, dtype=np.float64).reshape(-1, 4)
    hs, ws, h0, w0 = meta.T
    n = len(meta)
    if getattr(transform, "random", False):
        crop = transform.pipeline.transforms[0]
        if seeds is None:
            seeds = torch.randint(0, 2**62, (n,)).numpy()
        left, top, w, h, flip = random_boxes(h0, w0, np.asarray(seeds, dtype=np.uint64), crop.scale, crop.ratio)
        x1, y1, x2, y2 = left, top, left + w, top + h
    else:
        (x1, y1, x2, y2), flip = eval_boxes(h0, w0, transform.size), np.zeros(n, dtype=bool)
    sx, sy = ws / w0, hs / h0
    return np.stack([x1 * sx, y1 * sy, x2 * sx, y2 * sy, flip.astype(np.float64),
                     np.full(n, float(transform.size))], axis=1).astype(np.float32)
