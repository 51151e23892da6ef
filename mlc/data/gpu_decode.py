"""Optional JPEG decoding on the GPU (``--gpu-decode``), for when the CPUs cannot decode as fast as the GPU trains.

A cloud GPU node has 8-12 CPU cores per GPU; PIL decodes and resizes at most ~2,000-3,000 COMP5329-sized
JPEGs a second on that many cores, while a full fine-tune of ResNet50 on an H100 takes 5,000+. With
``--gpu-decode`` the loader workers only read the bytes and parse each JPEG's header (size, colour
mode); they draw the row's augmentation (crop box, flip) from the same per-row seeded generator as the
CPU path, and ship the compressed bytes. The training process decodes the whole batch with nvJPEG
(``torchvision.io.decode_jpeg(..., device="cuda")``), crops, resizes and flips on the device.

Files the GPU path does not take are decoded on the CPU exactly as without the flag: anything that is
not a baseline RGB or grayscale JPEG (CMYK, PNG named .jpg, GIF, ...). A JPEG whose data turns out to
be corrupt or truncated when decoded on the device is skipped, named and counted like any unreadable
image. The same code runs with ``device="cpu"`` (torchvision's libjpeg decoder), which is how the tests
check it on a machine without a GPU.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as TF

from mlc.io.images import open_header


@dataclass
class RawJpeg:
    """One row for the device decoder: the file's bytes and the row's augmentation, drawn in the worker."""
    data: torch.Tensor          # uint8, the compressed file
    params: tuple | None        # (top, left, height, width, flip) for training; None: the eval resize + crop
    y: torch.Tensor
    index: int
    name: str
    size: int                   # output side
    resize: int                 # eval: the shorter side before the centre crop
    tokens: list | None = None  # the row's caption token ids (--inputs image+caption)


def plan_raw(data: bytes, name: str, index: int, y, transform, max_pixels) -> RawJpeg | None:
    """In a loader worker: the row for the device decoder, or None when the CPU path must decode it.

    Raises :class:`mlc.io.images.BadImageError` for a file whose header is already unreadable, as the CPU path
    would.
    """
    im = open_header(data, name, max_pixels)  # header only: format, size, mode, and the decompression-bomb limit
    if im.format != "JPEG" or im.mode not in ("RGB", "L"):
        return None
    w0, h0 = im.size
    # The CPU path decodes a large JPEG at a reduced scale (draft) and draws the crop box on that size; draw
    # it on the same size here, then map it back onto the full-size image the device decodes.
    if transform.draft:
        im.draft(None, (transform.draft, transform.draft))
    w, h = im.size
    params = None
    if getattr(transform, "random", False):
        top, left, ch, cw, flip = transform.params(h, w)
        sy, sx = h0 / h, w0 / w
        params = (round(top * sy), round(left * sx), max(1, round(ch * sy)), max(1, round(cw * sx)), flip)
    return RawJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), params, y, index, name, transform.size,
                   transform.draft)


def decode_rows(raw: list, device: torch.device) -> tuple[list, list]:
    """Decode ``raw`` rows on ``device`` into uint8 (3, size, size) images.

    Returns ``(images, failed)``: one image or None per row, and a ``(row, reason)`` for each row whose
    data could not be decoded. A batch with one bad file is decoded again row by row, so only that row
    is lost.
    """
    datas = [r.data for r in raw]
    on_cuda = device.type == "cuda"
    if on_cuda:
        # torchvision's CUDA decode_jpeg allocates its outputs on the caller's stream, then writes them from a
        # stream of its own that does not wait for the caller's (pytorch/vision#9606): the caching allocator
        # may hand it blocks that kernels still queued on the caller's stream read (NaN losses and overwritten
        # tensors on an H200). Nothing may be queued when it decodes, and its writes must be done before the
        # caller's kernels read the images: a synchronisation on each side. Correctness first; the flag is off
        # by default (jobs/bench.py --gpu measures what it costs).
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():
        # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec, which is not (yet) a
        # dependency; one warning per batch would flood the log.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            images = []
            for d in datas:
                try:
                    images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError as e:
                    images.append(e)
    if on_cuda:
        torch.cuda.synchronize(device)
    out, failed = [], []
    for r, img in zip(raw, images):
        if isinstance(img, Exception):
            reason = str(img).splitlines()[-1].split(", ")[-1]
            failed.append((r, f"corrupt or truncated JPEG ({reason})"))
            out.append(None)
            continue
        if r.params is None:
            img = TF.center_crop(TF.resize(img, r.resize, antialias=True), [r.size, r.size])
        else:
            top, left, h, w, flip = r.params
            img = TF.resize(img[:, top:top + h, left:left + w], [r.size, r.size], antialias=True)
            if flip:
                img = TF.hflip(img)
        out.append(img)
    return out, failed
