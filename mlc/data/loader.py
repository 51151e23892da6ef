"""Loaders: each rank's share of every global batch (:class:`RankBatches`) and the :class:`Loader` that makes those
batches from a source (:mod:`mlc.data.sources`) ahead of the step that needs them, in worker processes or, once
the decode-once store holds the rows, in one thread."""

from __future__ import annotations

import queue
import random
import signal
import threading
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlc.data.batch import Batch
from mlc.data.sources import RowSource


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

    ``first_step`` (training): the epoch resumed after that many global batches; the plan holds the rest.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
                 world: int = 1, drop_last: bool = False, first_step: int = 0):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        if shuffle:
            g = torch.Generator()
            g.manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(n, generator=g).tolist()
            whole = [order[i:i + batch_size] for i in range(0, n, batch_size)]
            if drop_last and whole and len(whole[-1]) < batch_size:
                whole.pop()
            # A resumed epoch starts after the global batches already trained: they are never read.
            self.batches = [b[rank::world] for b in whole[first_step:]]
            self.global_sizes = [len(b) for b in whole[first_step:]]
        else:
            mine = list(range(n))[rank::world]
            self.batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
            self.global_sizes = [len(b) for b in self.batches]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _seed_worker(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the training process handles it (a step checkpoint, then exit
    # 130), and its loader processes must keep serving batches until then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Anything a worker draws from numpy or random follows torch's per-worker seed.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _whole(batch: Batch) -> Batch:
    """The DataLoader's collate: a source's ``__getitems__`` already made the batch."""
    return batch


class Loader:
    """This rank's batches of one pass over ``source``, in order, each with its step's global row count.

    Worker processes (torch's DataLoader, ``workers`` of them, none: in this process) make the batches ahead
    of the step. When the source needs at most a batch of decoding (the decode-once store is full), one
    thread copies them instead: no process start-up and no 300 KB rows pickled between processes; copies of
    memory-mapped slots and the pinning release the GIL, so they overlap the step. :meth:`start` begins
    reading now, so that a pass started later finds its first batches ready.
    """

    def __init__(self, source: RowSource, plan: RankBatches, *, workers: int = 0, pin_memory: bool = False,
                 seed: int = 0, epoch: int = 0):
        self.source, self.plan, self.pin = source, plan, pin_memory
        left = source.to_decode()
        # At most one step's rows left to decode (those the first epoch's dropped last batch left out): the
        # thread decodes them itself.
        self.threaded = left is not None and left <= max(plan.global_sizes, default=0)
        self._loader = None
        if not self.threaded:
            source.set_plan(plan.batches, workers)  # before the workers fork: they inherit the plan
            g = torch.Generator()
            g.manual_seed(seed * 100_003 + epoch)
            self._loader = DataLoader(source, batch_sampler=plan, num_workers=workers, collate_fn=_whole,
                                      pin_memory=pin_memory, worker_init_fn=_seed_worker, generator=g,
                                      # Two batches in flight per worker (torch's default) hide decode jitter.
                                      prefetch_factor=2 if workers > 0 else None)
        self._started: Iterator[Batch] | None = None

    def __len__(self) -> int:
        return len(self.plan)

    def start(self) -> "Loader":
        self._started = self._batches(self._made())  # a DataLoader's worker processes start here
        return self

    def __iter__(self) -> Iterator[Batch]:
        it, self._started = self._started, None
        return it if it is not None else self._batches(self._made())

    def _made(self) -> Iterator[Batch]:
        return iter(self._loader) if self._loader is not None else self._thread()

    def _batches(self, made: Iterator[Batch]) -> Iterator[Batch]:
        for step, batch in enumerate(made):
            batch.global_rows = self.plan.global_sizes[step]
            yield batch

    def _thread(self, depth: int = 3) -> Iterator[Batch]:
        q: queue.Queue = queue.Queue(depth)
        stop, end = threading.Event(), object()

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
                for indices in self.plan:
                    if not put(self.source.batch(indices, pin_memory=self.pin)):
                        return
                put(end)
            except BaseException as e:  # noqa: BLE001 - raised in the consuming thread, which owns the run
                put(e)

        thread = threading.Thread(target=work, name="mlc-store-loader", daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not end:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


def make_loader(source: RowSource, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                num_workers: int = 0, pin_memory: bool = False, drop_last: bool = False, rank: int = 0,
                world: int = 1, first_step: int = 0) -> Loader:
    """This rank's :class:`Loader` of one pass; order and augmentation depend only on (seed, epoch), so a
    resumed epoch repeats. ``batch_size`` is global when ``shuffle`` (training: the rows of one optimizer step
    over all ranks) and per rank otherwise (scoring)."""
    if shuffle:
        source.set_epoch(seed, epoch)
    plan = RankBatches(len(source), batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world=world,
                       drop_last=drop_last, first_step=first_step)
    return Loader(source, plan, workers=num_workers, pin_memory=pin_memory, seed=seed, epoch=epoch)


def resolve_loader_workers(setting: int | None, cpus: int | None, device: torch.device) -> int:
    """DataLoader worker processes for one training or scoring process that may use ``cpus`` CPUs.

    On a GPU the model runs on the device, so every CPU but one (which feeds the GPU) decodes images.
    On a CPU the model needs the cores itself. With 2 or fewer, images are decoded in the training process
    between steps: a loader process there takes cores from the model's threads in the middle of its steps.
    Measured on the 2-core dev machine (8 paired passes each, 224 real JPEGs, bf16, depth 1): no loader
    process 2% faster than one for training (8 of 8 pairs) and for prediction (5 of 8), and at 91-93% of
    the model alone (docs/measurements.md). With more cores one process decodes beside the model (not
    measured here: this machine has 2).
    """
    if setting is not None:
        return setting
    cpus = max(1, int(cpus or 1))
    if device.type == "cuda":
        return max(1, cpus - 1)
    return 0 if cpus <= 2 else 1
