"""A slot's pixels as JPEG bytes and back: what the compact decode-once store keeps (:mod:`mlc.data.store`) and what a
packed dataset holds (:mod:`mlc.data.pack`). An image fitted to the store's slot (never enlarged) is encoded once;
the loader decodes it for every batch, on its CPUs, into the slot the device cuts crops from."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mlc.data.pack import QUALITY

# Lower qualities tried, in order, for an image whose JPEG does not fit a compact slot's bytes at QUALITY.
FALLBACK_QUALITIES = (75, 60, 45, 30, 15)


# Chroma at full resolution (4:4:4) where it fits, else PIL's usual 4:2:0 at the same quality. An image shrunk
# into its slot keeps colour detail that 4:2:0 halves: on the demo at --image-size 32 (48 px slots) the error fell
# from 3.06 to 1.97 grey levels for 16% more bytes, and the paired F1 gap to the raw store from -0.064 +- 0.017 to
# -0.011 +- 0.040 (8 seeds, docs/measurements-pack.md); real photos in 192 px slots: 2.26 to 1.88 grey levels.
SUBSAMPLING = (0, 2)


def encode_slot(pixels: np.ndarray, quality: int = QUALITY, limit: int | None = None) -> bytes:
    """``pixels`` (h, w, 3) uint8 as JPEG at ``quality``, or at the first lower quality whose bytes fit ``limit``;
    at each quality 4:4:4 chroma first, then 4:2:0 (:data:`SUBSAMPLING`)."""
    for q in (quality, *[q for q in FALLBACK_QUALITIES if q < quality]):
        for subsampling in SUBSAMPLING:
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "JPEG", quality=q, subsampling=subsampling)
            if limit is None or buf.tell() <= limit:
                return buf.getvalue()
    raise ValueError(f"an image of {pixels.shape[1]}x{pixels.shape[0]} px does not fit {limit} bytes even at "
                     f"JPEG quality {FALLBACK_QUALITIES[-1]}")


def slot_jpeg(original: bytes, pixels: np.ndarray, quality: int = QUALITY) -> bytes:
    """A packed slot's JPEG: the original file itself when it is a JPEG that decodes to exactly ``pixels`` (an
    image the slot holds unchanged: no second lossy encoding, and no more bytes than the source), else ``pixels``
    encoded at ``quality``. The COMP5329 images all fit a 320 px slot: kept, they are 10.9 KB an image with no
    error, against 15.7 KB and 0.53 grey levels re-encoded at 90 (docs/measurements-pack.md)."""
    if original[:3] == b"\xff\xd8\xff":
        try:
            with Image.open(io.BytesIO(original)) as img:
                same = img.size == (pixels.shape[1], pixels.shape[0]) and \
                    np.array_equal(np.asarray(img.convert("RGB")), pixels)
        except Exception:  # noqa: BLE001 - an odd file is simply encoded from its pixels
            same = False
        if same:
            return original
    return encode_slot(pixels, quality)


def decode_slot(data: bytes, out: np.ndarray) -> tuple[int, int]:
    """Decode a slot's JPEG into the top-left of ``out`` (side, side, 3), the rest filled from its last row and
    column as the raw store does (so sampling at the image's edge reads edge pixels); returns (h, w)."""
    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    h, w = img.shape[:2]
    out[:h, :w] = img
    out[:h, w:] = img[:, -1:]
    out[h:] = out[h - 1:h]
    return h, w
