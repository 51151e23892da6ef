"""The process group a run trains in, as the training loop sees it (:class:`Group`), the one-process group
(:class:`LocalGroup`), and what every group writes at an epoch's end (:func:`write_epoch`).

A :class:`Group` says exactly what training needs of where it runs: rank and world size, device, the CPUs the
process may use, how the model is wrapped (DDP), how objects are gathered across ranks, where the resume
state comes from, and where an epoch's files go. Ray Train's group (:class:`mlc.distributed.train.RayGroup`)
implements the same and differs only in reporting to Ray and finding its checkpoint through Ray.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from mlc.config import TrainConfig
from mlc.data.labels import LabelVocab
from mlc.eval.thresholds import ThresholdChoice
from mlc.io import storage
from mlc.model.checkpoint import load_state, save_model, save_state, scored_weights
from mlc.model.device import pick_device
from mlc.prediction.submission import write_predictions
from mlc.train.interrupts import Notice, SignalListener
from mlc.train.outputs import write_metrics
from mlc.train.run_folder import latest_epoch_checkpoint


@dataclass
class EpochEnd:
    """One finished epoch, as every rank sees it (the gathered validation scores included)."""
    epoch: int
    state: dict          # the resumable training state (mlc.model.checkpoint.make)
    metrics: dict        # this epoch's line of the history
    is_best: bool
    model_meta: dict     # meta.json of this epoch's model (mlc.model.checkpoint.model_meta)
    val_ids: np.ndarray
    val_probs: np.ndarray
    val_ok: np.ndarray
    val_truth: np.ndarray
    vocab: LabelVocab
    cfg: TrainConfig
    score: float = math.nan  # what orders the kept checkpoints: validation F1, or a refit's epoch (the last wins)


class Group(Protocol):
    rank: int
    world: int
    device: torch.device
    cpus: int | None          # CPUs reserved for this process (Ray's reservation); None: its CPU affinity
    tensorboard_url: str
    progress_url: str         # the run folder: progress.json (mlc.train.interrupts) and step checkpoints

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the steps run (DDP across the group); the bare one is kept for checkpoints and scoring."""

    def all_gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (a barrier)."""

    def latest(self) -> tuple[dict | None, str]:
        """The training state to resume from (None: a new run) and where it was read."""

    def end_epoch(self, end: EpochEnd) -> None:
        """Keep the epoch's checkpoint; called by every rank (on Ray it is a barrier)."""

    def listening(self) -> AbstractContextManager:
        """While training: notices this process should hear (SIGTERM and SIGINT in one process)."""

    def poll(self, due: bool, next_poll: int) -> tuple[Notice | None, bool, int]:
        """A notice for this run, and rank 0's ``(due, next_poll)`` as every rank agrees on them; every rank calls
        it at the same steps (on Ray it is a barrier)."""

    def keep_step(self, state: dict) -> None:
        """Keep a step checkpoint (mlc.model.checkpoint.make with ``step`` > 0); called by every rank."""


def write_epoch(folder: str, end: EpochEnd, *, state: bool, model: bool) -> None:
    """An epoch's files in ``folder``: the training state (``state``), and the model with its validation scores
    and predictions (``model``: meta.json written last, so a folder with one is complete)."""
    if state:
        save_state(folder, end.state)
    if model:
        save_model(folder, scored_weights(end.state), end.vocab, end.model_meta)
        write_predictions(folder, end.val_ids, end.val_probs, end.val_ok, end.vocab,
                          ThresholdChoice.from_dict(end.model_meta["threshold"]), prefix="val_", truth=end.val_truth)


class LocalGroup:
    """One process: the first GPU or the CPU; checkpoints in ``<output>/checkpoint`` (a step checkpoint replaces the
    epoch's there), best model in ``best/``; SIGTERM and SIGINT are notices."""
    rank, world, cpus = 0, 1, None

    def __init__(self, out: str):
        self.out = self.progress_url = out
        self.signals = SignalListener()
        self.ckpt_url, self.best_url = storage.join(out, "checkpoint"), storage.join(out, "best")
        self.tensorboard_url = storage.join(out, "tensorboard")
        self.device = pick_device()

    def wrap(self, model):
        return model

    def all_gather(self, obj) -> list:
        return [obj]

    def latest(self) -> tuple[dict | None, str]:
        state = load_state(self.ckpt_url)
        if state is not None:
            return state, self.ckpt_url
        # A Ray Train run's folder holds one epoch_NNNN/ per kept checkpoint, each with local mode's state.pt:
        # local mode continues the latest of them.
        latest = latest_epoch_checkpoint(self.out)
        return (load_state(latest), latest) if latest else (None, self.ckpt_url)

    def end_epoch(self, end: EpochEnd) -> None:
        if end.is_best:
            write_epoch(self.best_url, end, state=False, model=True)
        write_epoch(self.ckpt_url, end, state=True, model=False)
        write_metrics(self.out, end.state["history"], end.cfg, complete=False)

    def listening(self) -> SignalListener:
        return self.signals

    def poll(self, due: bool, next_poll: int) -> tuple[Notice | None, bool, int]:
        return self.signals.notice(), due, 0  # no barrier to pay here: poll after every step

    def keep_step(self, state: dict) -> None:
        save_state(self.ckpt_url, state)
