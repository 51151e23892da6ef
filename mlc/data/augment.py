"""Crops, resizes and flips of a whole batch on the device, for images read from the decode-once store
(:mod:`mlc.data.store`).

A stored image keeps its aspect ratio: it is shrunk (never enlarged) until both sides fit the slot, whose side
is :func:`slot_side`. Each row's crop box is drawn exactly as the CPU path draws it (the same per-row seeded
generator and ``RandomResizedCrop`` parameters on the image's original size, :mod:`mlc.data.transforms`) and
scaled onto the stored pixels; evaluation's box is the centre crop of ``Resize(size / 0.875)``. The device then
cuts and resizes every box of the batch in one ``roi_align`` call, flips and normalises
(:func:`mlc.data.transforms.crop_batch`).
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


def eval_box(height: int, width: int, size: int) -> tuple[float, float, float, float]:
    """Evaluation's crop (``ResizeCenterCrop(size / 0.875, size)``) as a box (x1, y1, x2, y2) on the original image."""
    resize = int(round(size / EVAL_CROP_RATIO))
    w, h = width, height
    nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    sx, sy = w / nw, h / nh
    return left * sx, top * sy, min(w, (left + size) * sx), min(h, (top + size) * sy)


def row_geometry(transform, meta, seed: int | None) -> list[float]:
    """``[x1, y1, x2, y2, flip, size]`` of one stored row: its crop box on the stored pixels, whether it flips,
    and the output side. ``meta`` is the store's (stored h, stored w, original h, original w); ``seed`` the
    row's augmentation seed (as :class:`mlc.data.datasets.ImageTable` seeds the CPU path), None for no seed."""
    hs, ws, h0, w0 = (int(v) for v in meta)
    if getattr(transform, "random", False):
        g = None
        if seed is not None:  # a private generator: loader threads must not reseed torch's global one
            g = torch.Generator()
            g.manual_seed(seed)
        top, left, h, w, flip = transform.params(h0, w0, g)
        box = (left, top, left + w, top + h)
    else:
        box, flip = eval_box(h0, w0, transform.size), False
    sx, sy = ws / w0, hs / h0
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy, float(flip), float(transform.size)]

