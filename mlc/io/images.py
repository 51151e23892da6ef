"""Turn the bytes of one image file into an RGB ``PIL.Image``, or say exactly why not.

A dataset of tens of thousands of files scraped from the web always holds a few
that are not what their name says: PNGs or GIFs named ``.jpg``, grayscale and
CMYK JPEGs, images with an alpha channel, files cut short by an interrupted
copy, HTML error pages saved as images, empty files, and occasionally an image
whose header claims billions of pixels. Each of those either crashes a
``DataLoader`` worker deep inside PIL or, worse, silently feeds the network
garbage. This module is the single place that decides, per file, whether the
image is usable, and reports unusable ones as a :class:`BadImageError` that names
the file and the reason so the caller can skip it and count it.

Two rules hold everywhere here:

* PIL globals (``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``)
  are never read as our policy and never mutated: they are process-wide, so
  changing them would silently change every other PIL user in the process
  (torchvision, matplotlib), and a per-call ``max_pixels`` is testable.
* An image is decoded completely (``load()``) before it is returned, so a
  truncated file fails here with its name instead of later, lazily, inside a
  transform.
"""

from __future__ import annotations

import io
import math
import re

import numpy as np
from PIL import Image, UnidentifiedImageError


# The real COMP5329 images are at most 320 px a side (~0.1 Mpx). 50 Mpx still
# accepts any camera photo someone might add (a 48 Mpx phone shot is 8000x6000)
# while refusing decompression bombs: a tiny file whose header claims e.g.
# 100000x100000 pixels would need 30 GB of RAM to decode and would kill the
# worker (or the whole node) with an out-of-memory error instead of failing
# with a message. Note PIL independently refuses anything over
# 2 * Image.MAX_IMAGE_PIXELS (~179 Mpx by default) inside Image.open, so raising
# max_pixels above that has no effect unless the caller changes PIL's global.
DEFAULT_MAX_PIXELS = 50_000_000

# The colour transparent pixels are composited onto. White, because that is
# what a browser or image viewer shows behind a transparent PNG, i.e. what a
# person labelling the image saw.
_MATTE = (255, 255, 255)

# Pixel modes whose samples are wider than 8 bits (16-bit PNG/TIFF, 32-bit int,
# float). PIL's convert("RGB") clips these at 255 instead of rescaling, which
# turns a 16-bit grayscale photo almost entirely white, so we rescale ourselves.
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


class BadImageError(ValueError):
    """One image file cannot be used; ``name`` says which and ``reason`` says why.

    ``kind`` is a short machine-readable category (``"empty"``, ``"missing"``,
    ``"not_image"``, ``"truncated"``, ``"corrupt"``, ``"too_large"``,
    ``"unsupported"``) so a dataset check can count failures by cause without
    parsing messages. It subclasses ``ValueError`` because the problem is the
    data, not the program or the infrastructure: storage errors (permissions,
    network) are deliberately *not* turned into this, so they still stop a run.
    """

    def __init__(self, name: str, reason: str, kind: str | None = None):
        self.name = name
        self.reason = reason
        self.kind = kind
        super().__init__(f"{name}: {reason}; skipped")

    def __reduce__(self):
        # The default pickling re-calls the class with ``self.args`` (just the
        # message), which does not fit our signature; DataLoader workers and Ray
        # tasks pickle exceptions to send them back, so rebuild from the fields.
        return (type(self), (self.name, self.reason, self.kind))


# Signatures of what a file named like an image often is instead (a failed download, a mislabelled upload).
_SIGNATURES = ((b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "gzip data"),
               (b"\x7fELF", "an executable"), (b"{", "JSON or other text"), (b"[", "JSON or other text"))


def looks_like(data: bytes) -> str:
    """What ``data`` appears to be, in words, for a message that must not show the bytes themselves."""
    head = data[:512].lstrip()
    lower = head.lower()
    if lower.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in lower:
        return "looks like an HTML page, e.g. an error page saved under an image's name"
    if lower.startswith(b"<?xml") or lower.startswith(b"<"):
        return "looks like XML or HTML text"
    for sig, what in _SIGNATURES:
        if head.startswith(sig):
            return f"looks like {what}"
    try:
        text = data[:4096].decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < 4000:  # not a multi-byte character cut at the end of the sample
            return "binary data of an unrecognised format"
        text = data[:e.start].decode("utf-8")
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return "looks like plain text"
    return "binary data of an unrecognised format"


def _open(data: bytes, name: str, max_pixels: int | None) -> Image.Image:
    """Parse only the header (``Image.open`` is lazy) and apply the size limit.

    The pixel-count check runs here, before any pixel is decoded, which is the
    whole point: once ``load()`` starts, PIL has already allocated the full
    width*height buffer.
    """
    if not data:
        raise BadImageError(name, "empty file", "empty")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # PIL's own message only repeats the BytesIO repr. What the file looks like tells a person that the
        # ".jpg" is really an HTML error page; its bytes are never shown (it may be any file at all).
        raise BadImageError(name, f"not an image ({looks_like(data)})", "not_image") from None
    except Image.DecompressionBombError as e:
        # PIL's hard limit (2 * MAX_IMAGE_PIXELS), hit before our own check can run.
        raise BadImageError(name, f"decompression bomb ({e})", "too_large") from None
    except Exception as e:  # noqa: BLE001 - plugins raise OSError, SyntaxError, struct.error, ... on a bad header
        raise BadImageError(name, f"corrupt image header ({type(e).__name__}: {e})", "corrupt") from None
    width, height = im.size
    if width <= 0 or height <= 0:
        raise BadImageError(name, f"corrupt image header (size {width}x{height})", "corrupt")
    if max_pixels is not None and width * height > max_pixels:
        raise BadImageError(
            name,
            f"decompression bomb ({width}x{height} = {width * height:,} pixels > limit {max_pixels:,})",
            "too_large",
        )
    return im


def read_header(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict:
    """Return ``{"format", "width", "height", "mode"}`` without decoding any pixels.

    This is for a fast whole-dataset check (tens of thousands of files in
    seconds): it catches empty files, non-images, unparseable headers and, with
    ``max_pixels`` (default: the same limit :func:`decode_image` applies;
    ``None`` to skip), decompression bombs. It cannot catch a file whose header
    is intact but whose pixel data is cut short or corrupt, since finding that
    needs a full decode: only :func:`decode_image` reports those.
    """
    im = _open(data, name, max_pixels)
    width, height = im.size
    return {"format": im.format, "width": width, "height": height, "mode": im.mode}


def _wide_to_l(im: Image.Image) -> Image.Image:
    """Rescale a >8-bit single-channel image to 8-bit ``L``.

    Values above 255 mean genuinely 16-bit data, scaled by 255/65535; float
    images in [0, 1] are scaled by 255; anything else is clipped to [0, 255].
    """
    arr = np.asarray(im, dtype=np.float64)
    peak = float(arr.max()) if arr.size else 0.0
    if peak > 255:
        arr = arr * (255.0 / 65535.0)
    elif im.mode == "F" and peak <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def _has_alpha(im: Image.Image) -> bool:
    # "transparency" in info covers palette images with a transparent index and
    # RGB/L images with a single transparent colour (PNG tRNS chunk).
    return im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    if _has_alpha(im):  # before the RGB shortcut: an RGB PNG can carry a transparent colour
        # Composite onto white rather than dropping the alpha channel: the
        # colour values stored under fully transparent pixels are arbitrary
        # (often black, sometimes leftover image content, whatever the encoder
        # kept), so convert("RGB") would expose them as if they were part of
        # the picture, e.g. a logo on a black slab instead of on a page.
        try:
            rgba = im.convert("RGBA")
        except (ValueError, OSError) as e:
            raise BadImageError(name, f"unsupported pixel mode {im.mode} ({e})", "unsupported") from None
        matte = Image.new("RGBA", rgba.size, _MATTE + (255,))
        return Image.alpha_composite(matte, rgba).convert("RGB")
    if im.mode == "RGB":
        return im
    if im.mode in _WIDE_MODES:
        return _wide_to_l(im).convert("RGB")
    try:
        # L, 1, P, CMYK (PIL already undoes Adobe's inverted CMYK in JPEGs),
        # YCbCr. Embedded ICC profiles are ignored: the network only needs
        # consistent colours, not calibrated ones.
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImageError(name, f"unsupported pixel mode {im.mode} ({e})", "unsupported") from None


# Start-of-frame markers of Huffman-coded JPEGs (baseline, extended, progressive): every block of every scan
# costs at least one bit, so the coded data holds at least one bit per MCU of the declared size. Arithmetic
# coding (C9-CB, CD-CF) can go below one bit; lossless and hierarchical files PIL does not read either way.
_HUFFMAN_SOF = (0xC0, 0xC1, 0xC2)
_OTHER_SOF = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
_SEGMENT = re.compile(rb"(?<=\xff)[\x01-\xfe]")  # a marker's code (after 0xFF and any fill bytes)
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # the end of a scan's coded data: a marker, not 0xFF00 or RSTn
# A JPEG has a few dozen segments (a progressive one about ten scans); past this many, no verdict.
_MAX_SEGMENTS = 10_000


def jpeg_shortfall(data: bytes) -> str | None:
    """Why a JPEG's coded data is too short for the size its header declares, or None. libjpeg fills what is
    missing with grey and only warns (PIL drops the warning), so a 7000 x 7000 header over a few hundred bytes
    would decode 'successfully' into a picture that is not in the file. Regular expressions find the markers and
    the ends of scans: the time is linear in the file's size whatever it holds."""
    if not data.startswith(b"\xff\xd8"):
        return None
    at, mcus, coded = 2, 0, 0
    for _ in range(_MAX_SEGMENTS):
        found = _SEGMENT.search(data, at)
        if found is None or found.group() == b"\xd9":  # the end of the image
            break
        marker, at = found.group()[0], found.end()
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            continue
        if marker in _OTHER_SOF:
            return None
        length = int.from_bytes(data[at:at + 2], "big")
        if marker in _HUFFMAN_SOF:
            mcus = _mcus(data[at + 2:at + length])
        at += length
        if marker == 0xDA:  # start of scan: its coded data runs to the next marker
            end = _SCAN_END.search(data, at)
            coded += (end.start() if end else len(data)) - at
            at = end.start() if end else len(data)
    if mcus and coded * 8 < mcus:
        return f"its header declares more pixels than its {coded:,} bytes of image data can hold"
    return None


def _mcus(frame: bytes) -> int:
    """Minimum coded units of a start-of-frame segment: precision, height, width, then per component its id,
    sampling factors (4 bits each) and table; 0 when the height is left to a later DNL segment."""
    if len(frame) < 6:
        return 0
    height, width = int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big")
    sampling = frame[7:6 + 3 * frame[5]:3]
    h_max = max((s >> 4 for s in sampling), default=1) or 1
    v_max = max((s & 15 for s in sampling), default=1) or 1
    return math.ceil(width / (8 * h_max)) * math.ceil(height / (8 * v_max))


def decode_image(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 draft: int | None = None) -> Image.Image:
    """Decode a whole image file (any format PIL reads, whatever its name) to RGB.

    ``name`` is only used in error messages (pass the ImageID or path).
    ``max_pixels`` bounds width*height and is checked from the header before
    decoding; ``None`` leaves only PIL's own hard limit.

    The image is decoded completely here so that truncated or corrupt data
    raises :class:`BadImageError` now. We never set PIL's
    ``LOAD_TRUNCATED_IMAGES``: it would "succeed" by filling the missing part
    with grey, training the model on half-blank images under real labels.

    EXIF orientation is deliberately not applied: the labels (COCO-derived)
    refer to the pixels as stored, and torchvision's own loader does the same.
    For multi-frame files (GIF, TIFF) the first frame is used.

    ``draft``: the smallest side the caller needs. A JPEG larger than that is decoded at the largest
    1/2, 1/4 or 1/8 scale that keeps both sides >= ``draft`` (libjpeg's DCT scaling: several times
    faster than a full decode followed by a resize). Other formats are decoded whole.
    """
    im = _open(data, name, max_pixels)
    if draft and im.format == "JPEG":
        im.draft(None, (draft, draft))
    try:
        im.load()
    except MemoryError:
        raise  # a real resource problem, not a property of this file
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        message = f"{type(e).__name__}: {e}" if not isinstance(e, OSError) else str(e)
        if "truncated" in str(e).lower():
            raise BadImageError(name, f"truncated image ({message})", "truncated") from None
        raise BadImageError(name, f"corrupt image ({message})", "corrupt") from None
    if im.format == "JPEG" and (shortfall := jpeg_shortfall(data)):
        raise BadImageError(name, f"corrupt image ({shortfall})", "corrupt")
    return _to_rgb(im, name)


def decode_fetched(data, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                   draft: int | None = None) -> Image.Image:
    """:func:`decode_image` for one value read by :mod:`mlc.io.fetch` (bytes, or the exception reading
    failed with): a missing object is a :class:`BadImageError` ``"missing"`` like in :func:`mlc.data.sources.load_image`;
    any other storage error (permission, network after retries) is raised as it is, naming the object."""
    if isinstance(data, FileNotFoundError):
        raise BadImageError(name, "missing", "missing")
    if isinstance(data, BaseException):
        raise data
    return decode_image(data, name, max_pixels, draft)


__all__ = ["BadImageError", "DEFAULT_MAX_PIXELS", "decode_image", "decode_fetched", "read_header"]
