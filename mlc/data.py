"""Datasets and loaders: images read by URL, unreadable ones skipped and named, never silently lost."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from . import storage
from .images import BadImageError, load_image
from .table import read_table


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
    """Rows of (image URL, optional multi-hot target). ``__getitem__`` returns ``Skipped`` for a bad image."""

    def __init__(self, urls: list[str], targets: np.ndarray | None, transform, max_pixels: int):
        self.urls, self.targets, self.transform, self.max_pixels = list(urls), targets, transform, max_pixels

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i: int):
        try:
            img = load_image(self.urls[i], max_pixels=self.max_pixels)
        except BadImageError as e:
            return Skipped(i, self.urls[i], e.reason)
        x = self.transform(img)
        y = torch.from_numpy(self.targets[i]) if self.targets is not None else torch.zeros(0)
        return x, y, i


@dataclass
class Batch:
    x: torch.Tensor | None
    y: torch.Tensor | None
    index: torch.Tensor
    skipped: list = field(default_factory=list)

    def __len__(self) -> int:
        return 0 if self.x is None else self.x.shape[0]

    def pin_memory(self):
        if self.x is not None:
            self.x, self.y = self.x.pin_memory(), self.y.pin_memory()
        return self


def collate(items) -> Batch:
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = [it for it in items if isinstance(it, Skipped)]
    if not good:
        return Batch(None, None, torch.zeros(0, dtype=torch.long), skipped)
    xs, ys, idx = zip(*good)
    return Batch(torch.stack(xs), torch.stack(ys), torch.tensor(idx, dtype=torch.long), skipped)


def _seed_worker(worker_id: int) -> None:
    # Augmentations draw from torch, numpy and random: seed the last two from torch's per-worker seed.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                num_workers: int = 0, pin_memory: bool = False, drop_last: bool = False) -> DataLoader:
    """A loader whose order and augmentation depend only on (seed, epoch), so a resumed epoch repeats exactly."""
    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory,
                      worker_init_fn=_seed_worker, generator=g,
                      persistent_workers=False)


def image_urls(images_root: str, ids) -> list[str]:
    return [storage.join(images_root, i) for i in ids]


def read_tables(paths: DataPaths) -> tuple[pd.DataFrame, pd.DataFrame]:
    train = read_table(paths.train_csv, require=("ImageID", "Labels"))
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
