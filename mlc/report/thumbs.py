"""Thumbnails for a report: small JPEG data URIs of the images a run read.

A validation image comes from the run's decode-once store (:mod:`mlc.data.store`) while this node still holds it:
the pixels training copied, no file read again. Any other image (a test image, a run that streamed, a store on
another node) is decoded again from the image folder by mlc's own loader (:func:`mlc.data.sources.load_image`:
the byte cache for remote images, the pixel limit checked before decoding, truncated and corrupt files refused).
The report says how many came from where.
"""

from __future__ import annotations

import base64
import io

from PIL import Image

from mlc.data.sources import load_image
from mlc.data.pack import is_pack, open_pack
from mlc.data.pack_source import PackIndex
from mlc.data.store import STORED, any_present, compact_bytes, open_existing
from mlc.data.store_choice import store_keys
from mlc.io.images import DEFAULT_MAX_PIXELS, BadImageError

# Longest side, px. The COMP5329 images are at most 320 px; at 112 px and quality 70 a thumbnail is 1-4 KB of
# JPEG (median 2.2 KB on the real images; a card with its caption and labels about 4 KB), so a 5 MB report holds
# several hundred beside its plots and tables (docs/report.md).
THUMB_SIDE = 112
JPEG_QUALITY = 70

STORE, FOLDER, UNREADABLE = "the run's decode-once store", "the image folder", "unreadable"


class Thumbnails:
    """Thumbnails by ImageID. ``store``: an open :class:`mlc.data.store.ImageStore` (closed by :meth:`close`) and
    ``slots``, each ImageID's slot in it."""

    def __init__(self, store=None, slots: dict | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 packs: dict | None = None):
        self.store, self.slots, self.max_pixels = store, slots or {}, max_pixels
        self.packs = packs or {}  # image folder URL -> mlc.data.pack_source.PackIndex, for a packed dataset

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            store.close()

    def get(self, image_id: str, url: str) -> tuple[str | None, str, str | None]:
        """``(data URI, where it came from, why there is none)``: the image as ``data:image/jpeg;base64,...``
        (:data:`STORE` or :data:`FOLDER`), or ``(None, UNREADABLE, the reason)``."""
        img = self._from_store(image_id)
        source = STORE
        if img is None:
            try:
                folder = url[:-len(image_id)].rstrip("/") if url.endswith(image_id) else None
                img = self.packs[folder].image(image_id) if folder in self.packs else \
                    load_image(url, self.max_pixels, name=image_id, draft=THUMB_SIDE)
            except Exception as e:  # noqa: BLE001 - one image without a thumbnail never stops a report
                why = e.reason if isinstance(e, BadImageError) else \
                    f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                return None, UNREADABLE, why
            source = FOLDER
        return "data:image/jpeg;base64," + base64.b64encode(jpeg(img)).decode("ascii"), source, None

    def _from_store(self, image_id: str):
        slot = self.slots.get(image_id)
        if self.store is None or slot is None or self.store.state[slot] != STORED:
            return None
        return Image.fromarray(self.store.image(slot))


def jpeg(img: Image.Image, side: int = THUMB_SIDE, quality: int = JPEG_QUALITY) -> bytes:
    """``img`` shrunk to fit ``side`` x ``side`` (never enlarged), as JPEG bytes."""
    img = img.convert("RGB")
    img.thumbnail((side, side), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def open_thumbnails(run_urls: list | None, image_size: int | None, ids: list | None, key: str | None = None,
                    folders=()) -> Thumbnails:
    """Thumbnails reading from the store of a run whose labelled images are ``run_urls`` (in table order, ImageIDs
    ``ids``; ``key``: a pack's source key, see :func:`mlc.data.store_choice.store_keys`) at ``image_size`` when this
    node holds it now, else from the image ``folders`` (a pack among them read by row groups)."""
    packs = {f.rstrip("/"): PackIndex(open_pack(f)) for f in dict.fromkeys(folders) if f and is_pack(f)}
    if not run_urls or not any_present():
        return Thumbnails(packs=packs)
    keys, side = store_keys(run_urls, image_size, key)
    for form, name in keys.items():
        store = open_existing(name, len(run_urls), side, compact_bytes(side) if form == "compact" else None)
        if store is not None:
            return Thumbnails(store, {str(i): k for k, i in enumerate(ids)}, packs=packs)
    return Thumbnails(packs=packs)
