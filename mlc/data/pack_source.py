"""Reading a pack's images (:mod:`mlc.data.pack`) for a run: into the decode-once store a whole shard per request
(:func:`fill_store`: training and validation), or a few rows at a time by row group (:class:`PackedTable`:
prediction, which reads each row once, in order).

A training epoch visits the rows in a random order, so rows are never read from the pack as a batch asks for
them (every batch would touch most shards): the store takes the whole table before the first step, each shard
read once per node, a few shards in flight while the last one is stored.
"""

from __future__ import annotations

import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mlc.data.augment import fit_to_slot
from mlc.data.batch import Skipped
from mlc.data.pack import IMAGE_COLUMNS, TABLES, Pack, PackError, RowGroups, read_frame, read_shard
from mlc.errors import DataError
from mlc.io.images import BadImageError
from mlc.io import storage
from mlc.data.sources import RowSource

# Shards read ahead of the one being stored: enough to keep a remote store's requests going while one is
# decoded, few enough that their bytes (64 MiB each) stay small beside the store.
READ_AHEAD = 2


@dataclass
class PackedImages:
    """Where each of a list of ImageIDs is in a pack (``locs``: its table's index in ``TABLES`` and its row): what
    prediction reads instead of an image folder."""
    pack: Pack
    locs: np.ndarray
    ids: list

    @property
    def url(self) -> str:
        return self.pack.url

    def take(self, positions) -> "PackedImages":
        """The rows at ``positions`` of the list."""
        positions = np.asarray(positions, dtype=np.int64)
        return PackedImages(self.pack, self.locs[positions], [self.ids[p] for p in positions])


def locate_ids(pack: Pack, ids: list, what: str = "ImageIDs to predict",
               advice: str = "predict them from their source, or pack a table that lists them") -> PackedImages:
    """The rows of ``ids`` in ``pack`` (either table); an ImageID the pack lacks is refused (``what`` the ids are,
    and ``advice``, in the error)."""
    index: dict = {}
    for t, table in enumerate(TABLES):
        for r, image_id in enumerate(read_frame(pack, table).ImageID):
            index.setdefault(image_id, (t, r))
    missing = [i for i in ids if i not in index]
    if missing:
        raise DataError(f"{len(missing)} of the {len(ids)} {what} are not in the pack "
                        f"{storage.safe_url(pack.url)} (first: {missing[0][:80]!r}); {advice}")
    return PackedImages(pack, np.array([index[i] for i in ids], dtype=np.int64).reshape(-1, 2), list(ids))


def fill_store(store, images: PackedImages, log=print) -> int:
    """Store every row (slot i: ``images`` row i) that ``store`` lacks, reading each pack shard that holds any of
    them whole, once; returns the rows stored. Processes of one node sharing the store start at different shards
    and skip rows already there, so together they read each shard about once. A shard holding other ImageIDs than
    the manifest places there is refused (:class:`PackError`)."""
    todo = _by_shard(images, np.flatnonzero(store.empty(np.arange(len(images.ids)))))
    if not todo:
        return 0
    keys = sorted(todo)
    first = os.getpid() % len(keys)
    keys = keys[first:] + keys[:first]
    log(f"image store: filling from the pack {storage.safe_url(images.url)}: {len(keys)} shards, one request each")
    began, stored, columns = time.perf_counter(), 0, ["ImageID", *IMAGE_COLUMNS]
    with ThreadPoolExecutor(READ_AHEAD + 1) as reads, ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as work:
        pending = {key: reads.submit(read_shard, images.pack, TABLES[key[0]], key[1], columns)
                   for key in keys[:READ_AHEAD + 1]}
        for n, key in enumerate(keys):
            if n + READ_AHEAD + 1 < len(keys):
                nxt = keys[n + READ_AHEAD + 1]
                pending[nxt] = reads.submit(read_shard, images.pack, TABLES[nxt[0]], nxt[1], columns)
            cols = pending.pop(key).result().to_pydict()
            stored += _store_shard(store, images, key, cols, todo[key], work)
            rate = stored / max(time.perf_counter() - began, 1e-9)
            log(f"image store: shard {n + 1}/{len(keys)} stored ({stored} images, {rate:.0f} images/s)")
    return stored


def _by_shard(images: PackedImages, slots: np.ndarray) -> dict:
    """``{(table index, shard): [(slot, offset in the shard)]}`` for ``slots``."""
    out: dict = {}
    for t in range(len(TABLES)):
        mine = slots[images.locs[slots, 0] == t]
        if not len(mine):
            continue
        starts = images.pack.starts(TABLES[t])
        rows = images.locs[mine, 1]
        shard = np.searchsorted(starts, rows, side="right") - 1
        for slot, k, row in zip(mine, shard, rows):
            out.setdefault((t, int(k)), []).append((int(slot), int(row - starts[k])))
    return out


def _store_shard(store, images: PackedImages, key: tuple, cols: dict, rows: list, pool: ThreadPoolExecutor) -> int:
    """The ``rows`` ((slot, offset)) of one shard (``cols``) put into their slots, decoding in ``pool``."""
    for slot, j in rows:
        if cols["ImageID"][j] != images.ids[slot]:
            spec = images.pack.shards(TABLES[key[0]])[key[1]]
            raise PackError(f"{storage.safe_url(storage.join(images.url, spec['file']))}: row {j} holds "
                            f"{cols['ImageID'][j][:80]!r} where the manifest and tables place "
                            f"{images.ids[slot][:80]!r}; pack again")

    def put(item) -> None:
        slot, j = item
        if cols["reason"][j]:
            store.put_bad(slot, cols["reason"][j])
            return
        stored, original = (cols["height"][j], cols["width"][j]), (cols["orig_height"][j], cols["orig_width"][j])
        if images.pack.encoding == "jpeg" and max(stored) <= store.side:
            store.put_encoded(slot, cols["image"][j], stored, original)  # kept as is, or decoded once into the slot
        else:  # raw pixels, or an image packed for a larger slot than this run's: fitted as the store fits images
            store.put(slot, fit_to_slot(_decoded(images.pack.encoding, cols["image"][j], stored), store.side), original)
    list(pool.map(put, rows))
    return len(rows)


class PackedTable(RowSource):
    """Rows of a pack (``images``: where each is), read a row group at a time; each image is its slot, decoded and
    transformed on the CPU like a streamed image. For prediction: rows read once, in order."""

    def __init__(self, images: PackedImages, targets, transform, captions=None, read_images: bool = True):
        names = [storage.join(images.url, TABLES[t], i) for (t, _), i in zip(images.locs, images.ids)]
        super().__init__(names, targets, transform, 0, captions=captions, read_images=read_images)
        self.images = images

    def batch(self, indices, pin_memory: bool = False):
        indices = [int(i) for i in indices]
        if not self.reads.images:
            return self._made(indices, [])
        crops, kept, skipped = [], [], []
        for i in indices:
            t, row = (int(v) for v in self.images.locs[i])
            groups = row_groups(self.images.pack, TABLES[t])
            k, g, j = groups.locate(row)
            group = groups.group(k, g)
            reason = group.column("reason")[j].as_py()
            if reason:
                skipped.append(Skipped(i, self.urls[i], reason))
                continue
            crops.append(self._crop(i, self._image(group, j)))
            kept.append(i)
        batch = self._made(kept, skipped, images=torch.stack(crops) if crops else None)
        return batch.pin_memory() if pin_memory else batch

    def _image(self, group, j: int) -> Image.Image:
        return _group_image(self.images.pack, group, j)


class PackIndex:
    """Images of a pack by ImageID, one at a time (a row group a request, recent groups kept): what a report's
    thumbnails read. The index of both tables is built on the first lookup."""

    def __init__(self, pack: Pack):
        self.pack, self._rows = pack, None

    def image(self, image_id: str) -> Image.Image:
        """The ImageID's slot image; :class:`BadImageError` when the pack lacks it or could not read it."""
        if self._rows is None:
            self._rows = {}
            for table in TABLES:
                for r, i in enumerate(read_frame(self.pack, table).ImageID):
                    self._rows.setdefault(i, (table, r))
        name = storage.join(self.pack.url, image_id)
        if image_id not in self._rows:
            raise BadImageError(name, "not in the pack", "missing")
        table, row = self._rows[image_id]
        groups = row_groups(self.pack, table)
        k, g, j = groups.locate(row)
        group = groups.group(k, g)
        reason = group.column("reason")[j].as_py()
        if reason:
            raise BadImageError(name, reason, "corrupt")
        return _group_image(self.pack, group, j)


def _group_image(pack: Pack, group, j: int) -> Image.Image:
    stored = (group.column("height")[j].as_py(), group.column("width")[j].as_py())
    return _decoded(pack.encoding, group.column("image")[j].as_py(), stored)


def _decoded(encoding: str, data: bytes, stored: tuple) -> Image.Image:
    """A packed slot's image: its JPEG decoded, or its raw pixels."""
    if encoding == "raw":
        return Image.fromarray(np.frombuffer(data, np.uint8).reshape(*stored, 3))
    return Image.open(io.BytesIO(data)).convert("RGB")


_GROUPS: dict = {}


def row_groups(pack: Pack, table: str) -> RowGroups:
    """This process's reader of ``table``'s row groups (footers and recent groups kept across batches)."""
    key = (os.getpid(), pack.url, pack.manifest["source"]["key"], table)
    if key not in _GROUPS:
        _GROUPS[key] = RowGroups(pack, table)
    return _GROUPS[key]
