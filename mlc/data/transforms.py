"""Image transforms: random crops and flips for training, deterministic resize + centre crop otherwise.

The transforms run in the DataLoader workers on PIL images and end in **uint8** tensors: a worker
ships 1 byte per pixel channel to the training process instead of 4 (float32), and the conversion
to float and the ImageNet normalisation happen on the device, in one fused step of the batch
(:func:`to_model_input`). Each transform also says how small a JPEG may be decoded for it
(``draft``): PIL's ``draft()`` decodes a large JPEG at 1/2, 1/4 or 1/8 scale, much faster, while
every side stays at least that size.

The 2020 report applied training augmentation at test time; evaluation and
prediction here are deterministic so the same image always gets the same score.
"""

from __future__ import annotations

import math

import torch
from torchvision import transforms as T

# The statistics the torchvision ImageNet weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Resize to size/0.875 then crop: torchvision's standard ImageNet evaluation ratio (256 -> 224).
EVAL_CROP_RATIO = 0.875
# scale >= 0.35 rather than ImageNet's 0.08: small crops would cut away the labelled objects.
TRAIN_SCALE = (0.35, 1.0)


class ImageTransform:
    """A PIL -> uint8 CHW tensor transform plus the smallest side a JPEG may be decoded at for it."""

    def __init__(self, steps, size: int, draft: int, random: bool):
        self.pipeline = T.Compose([*steps, T.PILToTensor()])
        self.size, self.draft, self.random = size, draft, random

    def __call__(self, img):
        return self.pipeline(img)

    def params(self, height: int, width: int, generator: torch.Generator | None = None) -> tuple:
        """The random crop box and flip this transform would draw for an image of this size: the same draws in
        the same order as the pipeline's RandomResizedCrop and flip, from ``generator`` (default: torch's
        global one, as the pipeline uses), so a caller can check a crop the device makes against the CPU's;
        a private generator lets a thread draw them without touching the global one."""
        crop = self.pipeline.transforms[0]
        return (*random_resized_crop_params(height, width, crop.scale, crop.ratio, generator),
                bool(torch.rand(1, generator=generator) < 0.5))


def random_resized_crop_params(height: int, width: int, scale, ratio, generator=None) -> tuple:
    """``T.RandomResizedCrop.get_params`` with an optional generator: the same draws, so the same box from the
    same seed (tests/test_store.py checks it against torchvision's)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)  # fallback to a centre crop, as torchvision does
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(size: int) -> ImageTransform:
    # The smallest crop RandomResizedCrop takes covers TRAIN_SCALE[0] of the area at aspect up to 4/3, so
    # its shorter side is >= sqrt(0.35 * 3/4) ~ 0.51 of the image's: an image decoded with sides of at least
    # size / 0.51 still gives every crop at full resolution.
    draft = math.ceil(size / math.sqrt(TRAIN_SCALE[0] * 3 / 4))
    return ImageTransform([T.RandomResizedCrop(size, scale=TRAIN_SCALE, antialias=True),
                           T.RandomHorizontalFlip()], size, draft, random=True)


class ResizeCenterCrop:
    """``Resize(resize)`` then ``CenterCrop(size)`` on a PIL image, as torchvision computes them, in one resize
    of the crop's box.

    PIL's resize with a ``box`` samples the source at the same points as the resize of the whole image (the
    box only offsets them, and the filter still reads the pixels around the box), so the result is the same
    to within one level of rounding, but only the kept size x size pixels are computed: at 224 px, a 224 x 224
    output instead of 341 x 256 for a 4:3 image. Measured on the 2-core dev CPU, 300 real COMP5329 JPEGs,
    3 alternating passes: decode and eval transform 0.66-0.70 ms per image against 0.98-1.18 ms for the
    two steps (1.5x); 3.8% of the values differ, by one level.
    """

    def __init__(self, resize: int, size: int):
        self.resize, self.size = resize, size

    def __call__(self, img):
        from PIL import Image
        w, h = img.size
        # torchvision's Resize(int): the shorter side becomes ``resize``, the longer is truncated to an int.
        nw, nh = (self.resize, int(self.resize * h / w)) if w <= h else (int(self.resize * w / h), self.resize)
        if min(nw, nh) < self.size:  # CenterCrop would pad: leave that to torchvision
            return T.CenterCrop(self.size)(T.Resize(self.resize, antialias=True)(img))
        top, left = int(round((nh - self.size) / 2.0)), int(round((nw - self.size) / 2.0))  # as CenterCrop rounds
        sx, sy = w / nw, h / nh
        # (min: a float rounding step past the edge would make PIL refuse the box)
        box = (left * sx, top * sy, min(w, (left + self.size) * sx), min(h, (top + self.size) * sy))
        return img.resize((self.size, self.size), Image.BILINEAR, box=box)


def eval_transform(size: int) -> ImageTransform:
    resize = int(round(size / EVAL_CROP_RATIO))
    return ImageTransform([ResizeCenterCrop(resize, size)], size, resize, random=False)


_STATS: dict = {}


def _stats(device: torch.device) -> tuple:
    """The ImageNet mean and 1/std in uint8 units, (1, 3, 1, 1) on ``device``, made once per device."""
    key = (device.type, device.index)
    if key not in _STATS:
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255)
        _STATS[key] = (mean, inv_std)
    return _STATS[key]


def to_model_input(x: torch.Tensor, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """A uint8 NCHW batch (as the loader ships it) -> normalised float32 on ``device``, channels_last.

    The copy is non-blocking from pinned memory on CUDA; the arithmetic runs on the device, where it is
    a few microseconds per batch, instead of in every loader worker.
    """
    mean, inv_std = _stats(device)
    x = x.to(device, non_blocking=device.type == "cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x.float() - mean) * inv_std


def crop_batch(x: torch.Tensor, geometry: torch.Tensor, device: torch.device, channels_last: bool = True):
    """Stored slots (B, side, side, 3) uint8 and their :func:`mlc.data.augment.geometry` rows (B, 6) -> the model's
    normalised float32 input (B, 3, size, size) on ``device``."""
    from torchvision.ops import roi_align
    nb = device.type == "cuda"
    x = x.to(device, non_blocking=nb).permute(0, 3, 1, 2).float()
    g = geometry.to(device, non_blocking=nb)
    size = int(geometry[0, 5])
    boxes = torch.cat([torch.arange(len(g), device=device, dtype=g.dtype).unsqueeze(1), g[:, :4]], dim=1)
    # aligned: pixel centres at +0.5, as PIL and torchvision's resize place them. sampling_ratio -1: as many
    # samples per output pixel as the box is larger than the output (averaged: no aliasing when shrinking).
    out = roi_align(x, boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flip = g[:, 4] > 0.5
    out = torch.where(flip.view(-1, 1, 1, 1), out.flip(3), out)
    mean, inv_std = _stats(device)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return (out - mean) * inv_std


def tokens_to_tensors(token_lists, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption token-id lists -> ``(ids, offsets)`` for an embedding bag: every row's ids end to end, and where
    each row starts. An empty list is an empty bag (a zero vector)."""
    device = torch.device(device)
    lengths = [len(t) for t in token_lists]
    ids = torch.tensor([i for t in token_lists for i in t], dtype=torch.long)
    offsets = torch.zeros(len(lengths), dtype=torch.long)
    if len(lengths) > 1:
        offsets[1:] = torch.tensor(lengths[:-1], dtype=torch.long).cumsum(0)
    nb = device.type == "cuda"
    return ids.to(device, non_blocking=nb), offsets.to(device, non_blocking=nb)
