"""Datasets: the tables' paths, the train/validation split, and images read by URL (unreadable ones skipped
and named, never silently lost); batches and loaders are in :mod:`mlc.data.loader`."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from mlc.io import fetch, storage
from mlc.io.images import DEFAULT_MAX_PIXELS, BadImageError, decode_fetched
from mlc.data.table import id_problem, read_table


def load_image(url: str, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None,
               draft: int | None = None):
    """Read one image through :mod:`mlc.io.fetch` (storage plus the byte cache) and decode it to RGB.

    A missing file is a :class:`BadImageError` with reason ``"missing"`` (a row in the CSV whose image is
    absent is a data problem like any other bad image). Other storage errors (permissions, network)
    propagate unchanged, because skipping them would silently drop data the run should have had. ``name``
    (default: ``url``) is what error messages call the file, e.g. ``data/5.jpg`` rather than a bucket URL.
    """
    try:
        data = fetch.read(url)
    except FileNotFoundError as e:
        data = e
    return decode_fetched(data, url if name is None else name, max_pixels, draft)


@dataclass
class DataPaths:
    train_csv: str
    test_csv: str
    images: str

    @classmethod
    def resolve(cls, data: str, images=None, train_csv=None, test_csv=None) -> "DataPaths":
        """The COMP5329S1A2Dataset layout under ``data``; each part can be overridden.

        A relative ``images`` is a folder inside ``data`` (``--images images`` for the real set's
        layout); the tables, when given, are paths or URLs as written (relative to the working folder).
        """
        def image_root():
            if images is None:
                return storage.join(data, "data")
            return images if "://" in images or images.startswith("/") else storage.join(data, images)
        return cls(train_csv or storage.join(data, "train.csv"), test_csv or storage.join(data, "test.csv"),
                   image_root())


def split_train_val(image_ids, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split that depends on the ImageIDs only, not on row order.

    Each id is ranked by a keyed hash; the ``ceil(fraction * n)`` smallest form
    the validation set, so the same seed gives the same split on any machine
    and after rows are reordered.
    """
    ids = list(image_ids)
    n = len(ids)
    n_val = int(np.ceil(fraction * n))
    if n_val < 1 or n_val >= n:
        raise ValueError(f"--val-fraction {fraction} of {n} training rows leaves an empty train or validation set")
    key = str(seed).encode()
    h = [hashlib.blake2b(i.encode(), digest_size=8, key=key).digest() for i in ids]
    order = sorted(range(n), key=lambda i: h[i])
    val = np.sort(np.array(order[:n_val]))
    train = np.sort(np.array(order[n_val:]))
    return train, val


@dataclass
class Skipped:
    index: int
    name: str
    reason: str


class ImageTable(Dataset):
    """Rows of (image URL, optional multi-hot target, optional caption tokens). ``__getitem__`` returns
    ``(x, y, i, tokens)``, or ``Skipped`` for a bad image.

    ``captions`` (one token-id list per row, :mod:`mlc.data.tokenizer`) go with each row; ``read_images=False``
    (``--inputs caption``) never reads an image: ``x`` is None and nothing is fetched.

    After ``set_epoch(seed, epoch)`` each row's augmentation draws from its own generator seeded by
    (seed, epoch, row): a row is augmented the same way whichever process, rank or loader worker reads
    it, so one worker with batch 2b and two DDP workers with batch b see identical images, and a
    resumed epoch repeats exactly.
    """

    def __init__(self, urls: list[str], targets: np.ndarray | None, transform, max_pixels: int,
                 gpu_decode: bool = False, captions: list | None = None, read_images: bool = True):
        self.urls, self.targets, self.transform, self.max_pixels = list(urls), targets, transform, max_pixels
        if captions is not None and len(captions) != len(self.urls):
            raise ValueError(f"{len(captions)} captions for {len(self.urls)} rows")
        if not read_images and captions is None:
            raise ValueError("a table that reads no images needs captions")
        self.captions, self.read_images = captions, read_images
        self.epoch_seed: int | None = None
        # The decode-once store (mlc.data.store) and each row's slot in it; None: decode on every read.
        self.store, self.slots = None, None
        # --gpu-decode: ship the bytes of plain JPEGs for the device to decode (mlc.data.gpu_decode).
        self.gpu_decode = gpu_decode

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.epoch_seed = (seed * 1_000_003 + epoch) * 10_000_019

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        """A batch of rows at once; torch's DataLoader calls this with each batch's index list.

        The batch's images are fetched together (:mod:`mlc.io.fetch`: many requests in flight, remote bytes
        cached on local disk for later epochs) and decoded as they arrive. With a plan (:meth:`set_plan`),
        the reads of the next batch this process will be asked for start before this one is decoded, so the
        network's latency overlaps the decoding. Rows come out exactly as ``[self[i] for i in indices]``:
        the same ``Skipped`` rows naming bad or missing images, the same per-row seeded augmentation.
        Storage errors other than a missing object (permission denied, retries exhausted) are raised,
        naming the object.
        """
        indices = [int(i) for i in indices]
        if not self.read_images:
            return [self._sample(i, None) for i in indices]
        if self.store is not None:
            return self.stored_rows(indices)
        where: dict = {}
        for k, i in enumerate(indices):
            where.setdefault(self.urls[i], []).append(k)
        draft = getattr(self.transform, "draft", None)
        pending = self._take_read_ahead(indices)
        if pending is None:
            pending = fetch.start(where)
        self._start_read_ahead(indices)
        out: list = [None] * len(indices)
        # Rows are decoded as their bytes arrive, while the rest of the batch is still being fetched; each
        # row's augmentation is seeded by the row alone, so the order of arrival changes nothing.
        for url, data in pending:
            for k in where.get(url, ()):
                i = indices[k]
                try:
                    out[k] = (self._raw(i, data, url) if self.gpu_decode else None) or \
                        self._sample(i, decode_fetched(data, url, self.max_pixels, draft))
                except BadImageError as e:
                    out[k] = Skipped(i, url, e.reason)
        return out

    def use_store(self, store, slots) -> None:
        """Read images through the decode-once ``store`` (:mod:`mlc.data.store`); row i is its slot ``slots[i]``."""
        if len(slots) != len(self.urls):
            raise ValueError(f"{len(slots)} store slots for {len(self.urls)} rows")
        self.store, self.slots = store, np.asarray(slots, dtype=np.int64)

    def to_decode(self) -> int | None:
        """Rows not yet in the store (None without a store): what reading this table would still decode."""
        return None if self.store is None else len(self.slots) - self.store.count(self.slots)

    def stored_rows(self, indices):
        """Rows through the store: those not there yet are fetched, decoded, fitted into their slots and stored
        (the first pass); then every row's pixels come from its slot with its crop box (``geometry``), for the
        device to cut out (:func:`mlc.data.augment.crop_batch`). Rows are ``(slot, y, i, tokens, geometry)``."""
        from mlc.data.augment import fit_to_slot, geometry
        from mlc.data.store import BAD, EMPTY
        st = self.store
        slots = self.slots[indices]
        where: dict = {}
        for k in np.flatnonzero(st.state[slots] == EMPTY):
            where.setdefault(self.urls[indices[k]], []).append(int(k))
        if where:
            pending = self._take_read_ahead([i for i in indices if self.urls[i] in where])
            if pending is None:
                pending = fetch.start(where)
            self._start_read_ahead(indices)
            for url, data in pending:
                for k in where.get(url, ()):
                    try:
                        img = decode_fetched(data, url, self.max_pixels, draft=st.side)
                    except BadImageError as e:
                        st.put_bad(int(slots[k]), e.reason)
                        continue
                    st.put(int(slots[k]), fit_to_slot(img, st.side), (img.size[1], img.size[0]))
        else:
            self._start_read_ahead(indices)
        state = st.state[slots]
        good = np.flatnonzero(state != BAD)
        pixels, meta = torch.from_numpy(st.pixels[slots[good]]), st.meta[slots[good]]
        out: list = [None] * len(indices)
        for k in np.flatnonzero(state == BAD):
            out[k] = Skipped(indices[k], self.urls[indices[k]], st.reason(int(slots[k])))
        rows = [indices[k] for k in good]
        boxes = torch.from_numpy(geometry(self.transform, meta, self.seeds(rows)))
        for j, k in enumerate(good):
            _, y, i, tokens = self._sample(indices[k], None)
            out[k] = (pixels[j], y, i, tokens, boxes[j])
        return out

    def seeds(self, rows):
        """Each row's augmentation seed this epoch (the CPU path's), None before :meth:`set_epoch`."""
        return None if self.epoch_seed is None else [(self.epoch_seed + i) % 2**63 for i in rows]

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

    def _take_read_ahead(self, indices):
        ahead, self._ahead = getattr(self, "_ahead", None), None
        if ahead is None or ahead[0] != os.getpid():
            return None  # none, or inherited through fork from another process (its reads are not ours)
        if ahead[1] == tuple(indices):
            return ahead[2]
        ahead[2].cancel()
        return None

    def _start_read_ahead(self, indices) -> None:
        pos = getattr(self, "_plan_pos", {}).get(tuple(indices))
        if pos is None or pos + self._plan_step >= len(self._plan):
            return
        nxt = self._plan[pos + self._plan_step]
        if self.store is not None:  # only what the store does not have yet
            from mlc.data.store import EMPTY
            nxt = [i for i in nxt if self.store.state[self.slots[i]] == EMPTY]
            if not nxt:
                return
        self._ahead = (os.getpid(), tuple(nxt), fetch.start(dict.fromkeys(self.urls[i] for i in nxt)))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ahead"] = None  # reads in flight belong to this process
        return state

    def _raw(self, i: int, data, url: str):
        """Row ``i`` for the device decoder, or None when it must be decoded here (see mlc.data.gpu_decode)."""
        from mlc.data.gpu_decode import plan_raw
        if isinstance(data, BaseException):
            return None  # decode_fetched names the missing object or raises the storage error
        y = torch.from_numpy(self.targets[i]) if self.targets is not None else torch.zeros(0)
        with torch.random.fork_rng(devices=[]):
            if self.epoch_seed is not None:
                torch.manual_seed((self.epoch_seed + i) % 2**63)
            raw = plan_raw(data, url, i, y, self.transform, self.max_pixels)
        if raw is not None and self.captions is not None:
            raw.tokens = self.captions[i]
        return raw

    def _sample(self, i: int, img):
        """``(x, y, i, tokens)`` for row ``i``'s decoded image (None: no image read), augmented as in
        ``__getitem__``."""
        tokens = self.captions[i] if self.captions is not None else None
        y = torch.from_numpy(self.targets[i]) if self.targets is not None else torch.zeros(0)
        if img is None:
            return None, y, i, tokens
        if self.epoch_seed is None:
            x = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.epoch_seed + i) % 2**63)
                x = self.transform(img)
        return x, y, i, tokens


def image_urls(images_root: str, ids) -> list[str]:
    """Each ImageID joined onto the image folder. The tables refuse ids that would leave it (absolute, URL,
    ``..``: :func:`mlc.data.table.id_problem`); ids given here some other way (the API) meet the same rule."""
    urls = []
    for i in ids:
        if (problem := id_problem(i)) is not None:
            from mlc.errors import DataError
            raise DataError(f"ImageID {i[:80]!r} cannot name an image in {storage.safe_url(images_root)}: {problem}; "
                            "ImageIDs are file names inside the image folder")
        urls.append(storage.join(images_root, i))
    return urls


# Enough rows that a folder holding most of the listed images cannot miss them all by chance, few enough to
# check in about one round trip (concurrently) before anything starts.
PREFLIGHT_IMAGES = 32


def check_images_found(images: str, urls: list, *, table: str, first: int = PREFLIGHT_IMAGES) -> None:
    """Fail before any work when the image folder does not exist or holds none of the first ``first``
    images the table lists (a wrong --images or --data); a few missing images are the bad-image budget's
    business, later."""
    from concurrent.futures import ThreadPoolExecutor

    from mlc.errors import DataError
    if not urls:
        return
    if not storage.isdir(images):
        raise DataError(f"image folder {storage.safe_url(images)} does not exist; check --data and --images "
                        "(relative --images are inside --data)")
    sample = urls[:first]
    with ThreadPoolExecutor(min(16, len(sample))) as pool:
        found = sum(pool.map(storage.exists, sample))
    if not found:
        raise DataError(f"none of the first {len(sample)} images listed in {storage.safe_url(table)} is in "
                        f"{storage.safe_url(images)} (e.g. {sample[0].rsplit('/', 1)[-1]}); check --data and --images")


def read_tables(paths: DataPaths, require_labels: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    train = read_table(paths.train_csv, require=("ImageID", "Labels"), trains=True, require_labels=require_labels)
    test = read_table(paths.test_csv)
    return train, test


class TooManyBadImages(RuntimeError):
    pass


class BadImageBudget:
    """Counts unreadable images; stops the run once more than ``max_fraction`` of ``total`` are bad.

    Each bad image is warned about once, by name, and counted once however many epochs meet it.
    """

    def __init__(self, total: int, max_fraction: float, log=print):
        self.total, self.max_fraction, self.log = total, max_fraction, log
        self.bad: dict[str, str] = {}

    def add(self, skipped: list) -> None:
        for s in skipped:
            if s.name not in self.bad:
                self.bad[s.name] = s.reason
                self.log(f"warning: skipping unreadable image {s.name}: {s.reason}")
        if len(self.bad) > self.max_fraction * self.total:
            names = ", ".join(list(self.bad)[:10])
            raise TooManyBadImages(
                f"{len(self.bad)} of {self.total} images are unreadable (more than --max-bad-fraction "
                f"{self.max_fraction:g}); first: {names}. Fix or remove them, or raise --max-bad-fraction.")
