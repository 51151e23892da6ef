"""Batches and loaders: rows collated into a :class:`Batch` and moved to the device (:func:`batch_to_device`),
each rank's share of every global batch (:class:`RankBatches`), the DataLoader that reads ahead for them, and
the thread that reads a decode-once store (:class:`ThreadLoader`)."""

from __future__ import annotations

import queue
import random
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mlc.data.datasets import Skipped
from mlc.data.transforms import crop_batch, to_model_input, tokens_to_tensors


@dataclass
class Batch:
    """Decoded rows (``x`` uint8, or None when no image is read; ``y``; ``tokens``, one id list per row when
    captions are used) first, then ``raw`` rows for the device decoder (``--gpu-decode``, each with its own
    ``tokens``); ``index`` holds the row numbers of both, in that order. ``y`` is None when no row is usable."""
    x: torch.Tensor | None
    y: torch.Tensor | None
    index: torch.Tensor
    skipped: list = field(default_factory=list)
    raw: list = field(default_factory=list)
    tokens: list | None = None
    # Rows from the decode-once store: ``x`` holds whole slots (B, side, side, 3) and this each row's crop box,
    # flip and output size (mlc.data.augment.geometry), applied on the device.
    geometry: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.index)

    def pin_memory(self):
        if self.x is not None:
            self.x = self.x.pin_memory()
        if self.y is not None:
            self.y = self.y.pin_memory()
        if self.geometry is not None:
            self.geometry = self.geometry.pin_memory()
        for r in self.raw:
            r.data = r.data.pin_memory()
        return self


def batch_to_device(batch, device: torch.device) -> tuple:
    """``(inputs, y, index, lost)`` of a loader batch on ``device``: the model's inputs (``(x,)`` normalised
    float images, ``(ids, offsets)`` caption tokens, or ``(x, ids, offsets)``; None when no row is usable),
    targets, row indices, and the rows the device decoder could not decode (``--gpu-decode``;
    mlc.data.datasets.Skipped)."""
    nb = device.type == "cuda"
    parts, ys, index, lost, tokens = [], [], [], [], []
    if batch.y is not None:
        n_good = len(batch.y)
        if batch.x is not None and batch.geometry is None:
            parts.append(batch.x.to(device, non_blocking=nb))
        ys.append(batch.y.to(device, non_blocking=nb))
        index.append(batch.index[:n_good])
        tokens.extend(batch.tokens or ())
    if batch.raw:
        from mlc.data.gpu_decode import decode_rows
        images, failed = decode_rows(batch.raw, device)
        lost = [Skipped(r.index, r.name, reason) for r, reason in failed]
        kept = [(r, img) for r, img in zip(batch.raw, images) if img is not None]
        if kept:
            parts.append(torch.stack([img for _, img in kept]))
            ys.append(torch.stack([r.y for r, _ in kept]).to(device, non_blocking=nb))
            index.append(torch.tensor([r.index for r, _ in kept], dtype=torch.long))
            tokens.extend(r.tokens for r, _ in kept if r.tokens is not None)
    if not ys:
        return None, None, torch.zeros(0, dtype=torch.long), lost
    inputs = ()
    if batch.geometry is not None:  # slots of the decode-once store: cut, resize and flip on the device
        inputs = (crop_batch(batch.x, batch.geometry, device),)
    elif parts:
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        inputs = (to_model_input(x, device),)
    if batch.tokens is not None or any(r.tokens is not None for r in batch.raw):
        inputs = inputs + tokens_to_tensors(tokens, device)
    y = torch.cat(ys) if len(ys) > 1 else ys[0]
    return inputs, y, torch.cat(index) if len(index) > 1 else index[0], lost


def collate(items) -> Batch:
    from mlc.data.gpu_decode import RawJpeg
    skipped = [it for it in items if isinstance(it, Skipped)]
    raw = [it for it in items if isinstance(it, RawJpeg)]
    good = [it for it in items if not isinstance(it, (Skipped, RawJpeg))]
    idx = [it[2] for it in good] + [r.index for r in raw]
    if not good:
        return Batch(None, None, torch.tensor(idx, dtype=torch.long), skipped, raw)
    xs, ys = [it[0] for it in good], [it[1] for it in good]
    tokens = [it[3] if len(it) > 3 else None for it in good]  # (x, y, i) rows carry no caption
    x = torch.stack(xs) if xs[0] is not None else None
    geometry = torch.stack([it[4] for it in good]) if len(good[0]) > 4 else None
    return Batch(x, torch.stack(ys), torch.tensor(idx, dtype=torch.long), skipped, raw,
                 list(tokens) if tokens[0] is not None else None, geometry)


def _seed_worker(worker_id: int) -> None:
    # Augmentations draw from torch, numpy and random: seed the last two from torch's per-worker seed.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class RankBatches(torch.utils.data.Sampler):
    """This rank's share of every batch of one epoch (a DataLoader ``batch_sampler``).

    Training (``shuffle=True``): a permutation seeded by (seed, epoch) is cut into *global* batches of
    ``batch_size`` rows (a last partial batch is dropped with ``drop_last``), and each global batch is
    dealt out round robin: rank r takes its rows r, r + world, ... So the rows of step k, summed over the
    ranks, are the same whatever the world size; every rank takes the same number of steps (a share is
    empty when ``batch_size < world``, or unequal by one row when ``world`` does not divide it), and a run
    resumed on another number of workers continues the same sequence. ``global_sizes[k]`` is step k's
    row count over all ranks, which the loss is normalised by.

    Evaluation (``shuffle=False``): every row once, dealt out round robin without padding or duplicates
    (so gathered scores cover the set exactly), then cut into this rank's batches of ``batch_size``.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
                 world: int = 1, drop_last: bool = False):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        if shuffle:
            g = torch.Generator()
            g.manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(n, generator=g).tolist()
            whole = [order[i:i + batch_size] for i in range(0, n, batch_size)]
            if drop_last and whole and len(whole[-1]) < batch_size:
                whole.pop()
            self.batches = [b[rank::world] for b in whole]
            self.global_sizes = [len(b) for b in whole]
        else:
            mine = list(range(n))[rank::world]
            self.batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
            self.global_sizes = None

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                num_workers: int = 0, pin_memory: bool = False, drop_last: bool = False,
                rank: int = 0, world: int = 1, persistent: bool = False) -> DataLoader:
    """This rank's loader; order and augmentation depend only on (seed, epoch), so a resumed epoch repeats.

    ``batch_size`` is global when ``shuffle`` (training: the rows of one optimizer step over all ranks)
    and per rank otherwise (scoring). ``persistent`` keeps the worker processes between passes.
    """
    if shuffle and hasattr(dataset, "set_epoch"):
        dataset.set_epoch(seed, epoch)
    batches = RankBatches(len(dataset), batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world=world,
                          drop_last=drop_last)
    left = getattr(dataset, "to_decode", lambda: None)()
    if left is not None and left <= batch_size:
        # (Nearly) every row is decoded already: copying slots needs no worker processes (no start-up, no
        # pickling of 300 KB rows between processes), only a thread that reads ahead. The rows the first
        # epoch's dropped last batch left out, at most a batch, are decoded by that thread.
        return ThreadLoader(dataset, batches, pin_memory=pin_memory)
    # Each loader worker starts fetching its next batch while it decodes this one (hides storage latency).
    plan_batches(dataset, batches, batch_size, drop_last, num_workers)
    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)  # seeds the loader workers (numpy/random in _seed_worker)
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin_memory, worker_init_fn=_seed_worker, generator=g,
                      persistent_workers=persistent and num_workers > 0,
                      # Two batches in flight per worker (torch's default) is enough to hide decode jitter.
                      prefetch_factor=2 if num_workers > 0 else None)


class StartedLoader:
    """A DataLoader whose worker processes start now, so that iterating it later finds batches ready."""

    def __init__(self, loader: DataLoader):
        self.loader, self.dataset, self.batch_sampler = loader, loader.dataset, loader.batch_sampler
        self._it = iter(loader)

    def __iter__(self):
        it, self._it = self._it, None
        return it if it is not None else iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def plan_batches(dataset, sampler, batch_size: int, drop_last: bool, num_workers: int) -> None:
    """Tell a dataset that reads ahead (:meth:`ImageTable.set_plan`) which batches its DataLoader will ask
    for: a :class:`RankBatches`' own batches, or those a BatchSampler makes from a plain ``sampler``. Call it
    in the process that creates the loader, before iterating (workers inherit the plan)."""
    if hasattr(dataset, "set_plan"):
        if isinstance(sampler, RankBatches):
            batches = sampler.batches
        else:
            batches = list(torch.utils.data.BatchSampler(sampler, batch_size, drop_last))
        dataset.set_plan(batches, num_workers)


def stored_batch(table, indices, pin_memory: bool = False) -> "Batch":
    """The :class:`Batch` of a store-backed table's rows ``indices``, equal to collating ``table[indices]``: when
    every row is in the store, the slots are copied straight into one (pinned) tensor by a few threads, with no
    per-row tensors to stack."""
    from mlc.data.augment import geometry
    from mlc.data.store import BAD, EMPTY
    st = table.store
    indices = [int(i) for i in indices]
    state = st.state[table.slots[indices]]
    if (state == EMPTY).any():  # a row the first epoch left out (its last partial batch): decode it now
        batch = collate(table.stored_rows(indices))
        return batch.pin_memory() if pin_memory else batch
    good = [i for i, s in zip(indices, state) if s != BAD]
    skipped = [Skipped(i, table.urls[i], st.reason(int(table.slots[i]))) for i, s in zip(indices, state) if s == BAD]
    index = torch.tensor(good, dtype=torch.long)  # as collate: the usable rows (skipped ones are named)
    if not good:
        return Batch(None, None, index, skipped)
    slots = table.slots[good]
    x = torch.empty((len(good), st.side, st.side, 3), dtype=torch.uint8, pin_memory=pin_memory)
    st.copy_rows(slots, x.numpy())
    meta = st.meta[slots]
    boxes = torch.from_numpy(geometry(table.transform, meta, table.seeds(good)))
    y = torch.from_numpy(table.targets[good]) if table.targets is not None else torch.zeros(len(good), 0)
    tokens = [table.captions[i] for i in good] if table.captions is not None else None
    if pin_memory:
        y, boxes = y.pin_memory(), boxes.pin_memory()
    return Batch(x, y, index, skipped, [], tokens, boxes)


class ThreadLoader:
    """Batches made by one thread of this process, ``depth`` ahead: for a dataset whose rows are only copied
    (the decode-once store), where loader processes would cost more than they save. Copies of memory-mapped
    slots and the pinning release the GIL, so they overlap the training step."""

    _END = object()

    def __init__(self, dataset, batch_sampler, *, pin_memory: bool = False, depth: int = 3):
        self.dataset, self.batch_sampler, self.pin, self.depth = dataset, batch_sampler, pin_memory, depth

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        q: queue.Queue = queue.Queue(self.depth)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for indices in self.batch_sampler:
                    if not put(stored_batch(self.dataset, indices, pin_memory=self.pin)):
                        return
                put(self._END)
            except BaseException as e:  # noqa: BLE001 - raised in the consuming thread, which owns the run
                put(e)

        thread = threading.Thread(target=work, name="mlc-store-loader", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()
