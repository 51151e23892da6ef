"""Sources of batches: the rows of one table (image URLs, targets, caption tokens) made into :class:`Batch`es, one
implementation per kind of storage behind the same interface.

- :class:`StreamTable`: every pass fetches and decodes the images again (or reads none: captions only).
- :class:`StoredTable`: through the decode-once store (:mod:`mlc.data.store`); the first pass decodes what the
  store lacks, every later pass copies whole slots and the device cuts them.

Both make a batch of the rows ``indices`` in one call (:meth:`RowSource.batch`, also ``__getitems__``, which
torch's DataLoader calls with each batch), and augment each row from its own seed (seed, epoch, row): a row
is cropped and flipped the same way whichever process, rank or loader worker reads it, so one worker with
batch 2b and two DDP workers with batch b see identical images, and a resumed epoch repeats exactly.
Unreadable images are skipped and named (:class:`mlc.data.batch.Skipped`), never silently lost.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from mlc.data.batch import Batch, Reads, Skipped, empty_batch
from mlc.io import fetch
from mlc.io.images import DEFAULT_MAX_PIXELS, BadImageError, decode_fetched


def load_image(url: str, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None,
               draft: int | None = None):
    """Read one image through :mod:`mlc.io.fetch` (storage plus the byte cache) and decode it to RGB.

    A missing file is a :class:`BadImageError` with reason ``"missing"`` (a row in the CSV whose image is
    absent is a data problem like any other bad image). Other storage errors (permissions, network)
    propagate unchanged, because skipping them would silently drop data the run should have had.
    """
    try:
        data = fetch.read(url)
    except FileNotFoundError as e:
        data = e
    return decode_fetched(data, url if name is None else name, max_pixels, draft)


class RowSource(Dataset):
    """The rows of one table. ``urls`` one per row; ``targets`` (n, C) float32 or None (a table to predict);
    ``captions`` one token-id list per row (:mod:`mlc.data.tokenizer`) or None; ``read_images`` False: no image
    is ever fetched (``--inputs caption``)."""

    def __init__(self, urls: list[str], targets: np.ndarray | None, transform, max_pixels: int,
                 captions: list | None = None, read_images: bool = True):
        self.urls, self.transform, self.max_pixels = list(urls), transform, max_pixels
        self.targets = targets if targets is not None else np.zeros((len(self.urls), 0), dtype=np.float32)
        if captions is not None and len(captions) != len(self.urls):
            raise ValueError(f"{len(captions)} captions for {len(self.urls)} rows")
        if not read_images and captions is None:
            raise ValueError("a table that reads no images needs captions")
        self.captions = captions
        self.reads = Reads(images=read_images, captions=captions is not None, side=transform.size)
        self.epoch_seed: int | None = None
        self._plan, self._plan_pos, self._plan_step, self._ahead = [], {}, 1, None

    def __len__(self) -> int:
        return len(self.urls)

    def __getitems__(self, indices) -> Batch:
        return self.batch(indices)

    def batch(self, indices, pin_memory: bool = False) -> Batch:
        """The :class:`Batch` of rows ``indices`` (this pass's augmentation)."""
        raise NotImplementedError

    def to_decode(self) -> int | None:
        """Rows a pass would still decode: None when every pass decodes them all (streaming)."""
        return None

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.epoch_seed = (seed * 1_000_003 + epoch) * 10_000_019

    def seeds(self, rows) -> list | None:
        """Each row's augmentation seed this epoch, None before :meth:`set_epoch`."""
        return None if self.epoch_seed is None else [(self.epoch_seed + i) % 2**63 for i in rows]

    def _made(self, rows: list, skipped: list, images=None, boxes=None) -> Batch:
        """The batch of the usable ``rows`` (in order) and the ``skipped`` ones."""
        if not rows:
            return empty_batch(self.reads, self.targets.shape[1], skipped)
        return Batch(torch.tensor(rows, dtype=torch.long), torch.from_numpy(self.targets[rows]), self.reads,
                     images=images, boxes=boxes,
                     tokens=[self.captions[i] for i in rows] if self.captions is not None else None,
                     names=[self.urls[i].rsplit("/", 1)[-1] for i in rows], skipped=skipped)

    def _crop(self, i: int, img) -> torch.Tensor:
        """Row ``i``'s decoded image transformed on the CPU, from the row's own seed this epoch."""
        if self.epoch_seed is None:
            return self.transform(img)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.epoch_seed + i) % 2**63)
            return self.transform(img)

    # Read-ahead: the next batch this process will be asked for starts fetching before this one is decoded.

    def set_plan(self, batches, num_workers: int) -> None:
        """The batches the next pass will ask for, in order, and the loader's worker count.

        Torch deals batches to its workers round robin (worker w gets batches w, w + n, w + 2n, ...; with
        no workers the main process gets them all), so each process knows which batch comes to it next
        and can start reading it early. A wrong guess costs one batch of reads, which the byte cache keeps.
        """
        self._plan = [list(map(int, b)) for b in batches]
        self._plan_pos = {tuple(b): k for k, b in enumerate(self._plan)}
        self._plan_step = max(1, int(num_workers))
        self._ahead = None

    def _reads(self, indices: list, wanted: dict, rows: list):
        """The fetches of ``wanted`` (url -> positions in ``indices``), already under way when a read-ahead
        started them for exactly ``rows``; the read-ahead of the batch planned after ``indices`` starts too."""
        ahead, self._ahead = self._ahead, None
        pending = None
        if ahead is not None and ahead[0] == os.getpid():  # not inherited through fork from another process
            if ahead[1] == tuple(rows):
                pending = ahead[2]
            else:
                ahead[2].cancel()
        self._start_read_ahead(indices)
        return pending if pending is not None else fetch.start(wanted)

    def _start_read_ahead(self, indices) -> None:
        pos = self._plan_pos.get(tuple(indices))
        if pos is None or pos + self._plan_step >= len(self._plan):
            return
        nxt = self._still_to_read(self._plan[pos + self._plan_step])
        if nxt:
            self._ahead = (os.getpid(), tuple(nxt), fetch.start(dict.fromkeys(self.urls[i] for i in nxt)))

    def _still_to_read(self, rows: list) -> list:
        return rows

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ahead"] = None  # reads in flight belong to this process
        return state


class StreamTable(RowSource):
    """Every pass reads and decodes the rows' images (many fetches in flight, remote bytes cached on local
    disk by :mod:`mlc.io.fetch`), crops and flips them on the CPU, and ships uint8 crops."""

    def batch(self, indices, pin_memory: bool = False) -> Batch:
        indices = [int(i) for i in indices]
        if not self.reads.images:
            return self._made(indices, [])
        wanted: dict = {}
        for k, i in enumerate(indices):
            wanted.setdefault(self.urls[i], []).append(k)
        out: list = [None] * len(indices)  # a crop, or the row's Skipped
        # Rows are decoded as their bytes arrive; each row's augmentation is seeded by the row alone, so the
        # order of arrival changes nothing.
        for url, data in self._reads(indices, wanted, indices):
            for k in wanted.get(url, ()):
                try:
                    out[k] = self._crop(indices[k], decode_fetched(data, url, self.max_pixels, self.transform.draft))
                except BadImageError as e:
                    out[k] = Skipped(indices[k], url, e.reason)
        crops = [(i, c) for i, c in zip(indices, out) if not isinstance(c, Skipped)]
        images = torch.stack([c for _, c in crops]) if crops else None
        batch = self._made([i for i, _ in crops], [c for c in out if isinstance(c, Skipped)], images=images)
        return batch.pin_memory() if pin_memory else batch



class StoredTable(RowSource):
    """Rows through a decode-once ``store``; row i is its slot ``slots[i]``. Rows the store lacks are fetched,
    decoded, fitted into their slots and stored (the first pass); then a batch is its slots copied into one
    (pinned) tensor by a few threads, with each row's crop box (:func:`mlc.data.augment.geometry`) for the
    device to cut out (:func:`mlc.data.transforms.crop_batch`)."""

    def __init__(self, urls, targets, transform, max_pixels, store, slots, captions=None):
        super().__init__(urls, targets, transform, max_pixels, captions=captions)
        if len(slots) != len(self.urls):
            raise ValueError(f"{len(slots)} store slots for {len(self.urls)} rows")
        self.store, self.slots = store, np.asarray(slots, dtype=np.int64)

    def to_decode(self) -> int:
        return len(self.slots) - self.store.count(self.slots)

    def batch(self, indices, pin_memory: bool = False) -> Batch:
        from mlc.data.augment import geometry
        indices = [int(i) for i in indices]
        self._fill(indices)
        slots = self.slots[indices]
        bad = self.store.unreadable(slots)
        skipped = [Skipped(i, self.urls[i], self.store.reason(int(s))) for i, s, b in zip(indices, slots, bad) if b]
        rows = [i for i, b in zip(indices, bad) if not b]
        if not rows:
            return self._made(rows, skipped)
        good = self.slots[rows]
        images = torch.empty((len(rows), self.store.side, self.store.side, 3), dtype=torch.uint8,
                             pin_memory=pin_memory)
        self.store.copy_rows(good, images.numpy())
        boxes = torch.from_numpy(geometry(self.transform, self.store.sizes(good), self.seeds(rows)))
        batch = self._made(rows, skipped, images=images, boxes=boxes)
        if pin_memory:
            batch.targets, batch.boxes = batch.targets.pin_memory(), batch.boxes.pin_memory()
        return batch

    def _fill(self, indices: list) -> None:
        """Decode into the store the rows of ``indices`` it does not hold yet."""
        from mlc.data.augment import fit_to_slot
        wanted: dict = {}
        for k in np.flatnonzero(self.store.empty(self.slots[indices])):
            wanted.setdefault(self.urls[indices[k]], []).append(int(k))
        if not wanted:
            self._start_read_ahead(indices)
            return
        for url, data in self._reads(indices, wanted, [i for i in indices if self.urls[i] in wanted]):
            for k in wanted.get(url, ()):
                slot = int(self.slots[indices[k]])
                try:
                    img = decode_fetched(data, url, self.max_pixels, draft=self.store.side)
                except BadImageError as e:
                    self.store.put_bad(slot, e.reason)
                    continue
                self.store.put(slot, fit_to_slot(img, self.store.side), (img.size[1], img.size[0]))

    def _still_to_read(self, rows: list) -> list:
        return [i for i, e in zip(rows, self.store.empty(self.slots[rows])) if e]
