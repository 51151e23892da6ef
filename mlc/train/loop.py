"""The training loop, shared by local mode and Ray Train: :func:`train` runs in every training process, as rank
``group.rank`` of ``group.world`` (:mod:`mlc.train.group`), and reads top to bottom: set up the run, then per
epoch train, validate, keep the checkpoint."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mlc.config import TrainConfig
from mlc.data.batch import Skipped
from mlc.data.loader import Loader, make_loader
from mlc.data.run_data import RunData
from mlc.eval.thresholds import evaluate
from mlc.model import checkpoint
from mlc.model.fusion import for_scoring
from mlc.model.precision import NAMES
from mlc.prediction.scores import predict_scores
from mlc.train.engine import EpochHooks, train_one_epoch
from mlc.train.interrupts import (TEARDOWN_MARGIN_S, Interrupted, Notice, Schedule, Terminated, describe,
                                  first_step, write_progress)
from mlc.train.group import EpochEnd, Group
from mlc.train.outputs import SCALAR_KEYS
from mlc.train.setup import Run, setup
from mlc.train.tracking import Board


@dataclass
class Trained:
    """What a training process hands back: the history, the unreadable images met, what it trained on, and every
    interruption of the run (mlc.train.interrupts)."""
    history: list
    bad_images: dict
    device: torch.device
    precision: str
    resumed: bool
    interruptions: list = field(default_factory=list)


def train(cfg: TrainConfig, group: Group, data: RunData, *, log=print, progress: bool = True,
          on_step=None) -> Trained:
    """Train ``cfg.epochs`` epochs in this process. Each rank trains on its share of every global batch;
    validation scores are gathered, so every rank computes the same metrics over the whole validation set
    and makes the same best-epoch decision. A run resumed inside an epoch continues at the step it stopped."""
    started = time.monotonic()
    say = log if group.rank == 0 else (lambda *_: None)
    run = setup(cfg, group, data, say)
    guard = Guard(run, group, say, started, on_step)
    # The store is closed however training ends; the last process on the node to close it removes it.
    with run.store if run.store is not None else contextlib.nullcontext(), group.listening():
        board = Board(group.tensorboard_url, log=say) if group.rank == 0 and run.start_epoch <= cfg.epochs else None
        loader = _train_loader(run, group, run.start_epoch, run.start_step)
        for epoch in range(run.start_epoch, cfg.epochs + 1):
            first, so_far = (run.start_step, run.so_far) if epoch == run.start_epoch else (0, {})
            lr = so_far.get("lr", run.steps.optimizer.param_groups[0]["lr"])
            # The totals of the steps before a resume are the whole group's: rank 0 carries them, so that the
            # gathered epoch adds them once whatever the world size now.
            so_far = {k: v for k, v in so_far.items() if k != "lr"} if group.rank == 0 else {}
            # The validation loader's workers start now and have their first batches ready when training ends,
            # and the next epoch's start during validation: the device never waits for a loader to start.
            val_loader = _val_loader(run, group) if run.refit is None else None
            stats = train_one_epoch(run.step_model, loader, run.steps, epoch=epoch, bad_images=run.budget,
                                    progress=progress and group.rank == 0, desc=f"epoch {epoch}/{cfg.epochs} train",
                                    hooks=guard.hooks(epoch, lr), first_step=first, so_far=so_far)
            loader = _train_loader(run, group, epoch + 1, 0) if epoch < cfg.epochs else None
            end = validate(run, group, val_loader, epoch, stats, lr, progress=progress and group.rank == 0)
            guard.timed(lambda: group.end_epoch(end))
            say(_epoch_line(end, cfg.epochs))
            if board is not None:
                board.epoch(end.metrics)
        if board is not None:
            board.finish(run.data.vocab.labels, run.history)
    return Trained(run.history, dict(run.budget.bad), run.device, NAMES[run.steps.amp_dtype],
                   run.resumed_from is not None, run.interruptions)


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The seed of the random stream a step draws from (dropout): a function of the step alone, so a run resumed at
    any step, or restarted, repeats it without saving generator states."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + step) * 1009 + rank


class Guard:
    """What happens between the steps of an epoch: the fault-drill hook, the polls for notices on the schedule
    every rank shares, step checkpoints on a notice or when one is due, and the first step after a restart
    (its interruption record)."""

    def __init__(self, run: Run, group: Group, log, started: float, on_step=None):
        self.run, self.group, self.log, self.started, self.on_step = run, group, log, started, on_step
        self.schedule = Schedule(run.cfg.checkpoint_every)
        self.progress: list = []
        self.handled: tuple | None = None  # (deadline,) of the preemption already checkpointed

    def hooks(self, epoch: int, lr: float) -> EpochHooks:
        rank = self.group.rank
        return EpochHooks(seed=lambda step: step_seed(self.run.cfg.seed, epoch, step, rank),
                          after=lambda step, totals: self.after(epoch, step, totals, lr))

    def timed(self, keep) -> None:
        """Keep a checkpoint (``keep()``), timing it for --checkpoint-every auto."""
        t = time.monotonic()
        keep()
        self.schedule.checkpointed(time.monotonic() - t)

    def after(self, epoch: int, step: int, totals, lr: float) -> None:
        if self.run.pending is not None:
            self._first_step_after_restart()
        if self.on_step is not None:
            self.on_step(epoch, step)
        done = (epoch - 1) * self.run.steps_per_epoch + step  # steps since the run's start: polls span epochs
        if done < self.schedule.next_poll:
            return
        due, next_poll = self.schedule.proposal(done) if self.group.rank == 0 else (False, 0)
        notice, due, self.schedule.next_poll = self.group.poll(due, next_poll)
        if self.group.rank == 0:
            write_progress(self.group.progress_url, epoch, step, self.progress)
        if notice is not None and notice.reason == "preemption" and self.handled == (notice.deadline_s,):
            notice = None
        if notice is None and not due:
            return
        reason = notice.reason if notice is not None else "time"
        mine = totals()
        parts = self.group.all_gather(mine)  # the epoch's totals so far over every rank
        so_far = {k: sum(p[k] for p in parts) for k in ("loss_sum", "images")}
        so_far.update(steps=mine["steps"], seconds=max(p["seconds"] for p in parts), lr=lr)
        state = self.run.state(epoch - 1, step=step, so_far=so_far, reason=reason)
        self.timed(lambda: self.group.keep_step(state))
        self.log(f"step checkpoint ({reason}) in epoch {epoch} after step {step}")
        if notice is not None:
            self._act_on(notice, epoch, step)

    def _act_on(self, notice: Notice, epoch: int, step: int) -> None:
        if notice.reason == "signal":
            raise (Terminated if notice.signum == signal.SIGTERM else Interrupted)(self.group.progress_url, epoch, step)
        # Preempted: idle until Ray tears the group down at the deadline and restarts it from the checkpoint
        # (steps trained now would be thrown away). Past the deadline and a margin, nothing came: go on.
        self.handled = (notice.deadline_s,)
        until = (notice.deadline_s or time.time()) + TEARDOWN_MARGIN_S
        self.log(f"preemption notice: waiting for the restart (deadline in "
                 f"{max(0.0, (notice.deadline_s or time.time()) - time.time()):.0f} s)")
        while time.time() < until:
            time.sleep(0.5)
        self.log("preemption notice: no restart came; training goes on")

    def _first_step_after_restart(self) -> None:
        record = first_step(self.run.pending, self.group.world, time.monotonic() - self.started)
        self.run.pending = None
        self.run.interruptions.append(record)
        self.log(describe(record))


def _train_loader(run: Run, group: Group, epoch: int, first_step: int) -> Loader | None:
    """This rank's batches of ``epoch`` from ``first_step`` on: the steps before it are never read."""
    if epoch > run.cfg.epochs:
        return None
    return make_loader(run.train_source, run.cfg.batch_size, shuffle=True, seed=run.cfg.seed, epoch=epoch,
                       num_workers=run.loader_workers, pin_memory=run.device.type == "cuda", drop_last=run.drop_last,
                       rank=group.rank, world=group.world, first_step=first_step).start()


def _val_batch(run: Run, group: Group) -> int:
    # Scoring batches are each rank's training share: the shapes cuDNN has already timed its algorithms for,
    # not a second set to time in the first epoch (predict_scores pads the last one to it on a GPU).
    return max(1, math.ceil(run.cfg.batch_size / group.world))


def _val_loader(run: Run, group: Group) -> Loader:
    return make_loader(run.val_source, _val_batch(run, group), shuffle=False, num_workers=run.loader_workers,
                       pin_memory=run.device.type == "cuda", rank=group.rank, world=group.world).start()


def validate(run: Run, group: Group, val_loader: Loader, epoch: int, stats: dict, lr: float, *,
             progress: bool) -> EpochEnd:
    """Score the validation rows on every rank, gather them, and make the epoch's checkpoint and history row.
    The bare module scores: ranks hold different numbers of validation batches, and DDP's forward would wait
    for the others."""
    data, cfg = run.data, run.cfg
    if run.steps.ema is not None:
        run.steps.ema.agree(group.all_gather)  # one average on every rank: rank 0's BatchNorm statistics
    if run.refit is not None:
        return _refit_end(run, group, epoch, stats, lr)
    scored = predict_scores(for_scoring(run.scored_model(), run.steps.amp_dtype, cfg.tta), val_loader, run.device,
                            n_rows=len(data.va), amp_dtype=run.steps.amp_dtype, progress=progress,
                            desc=f"epoch {epoch}/{cfg.epochs} validate",
                            pad_to=_val_batch(run, group) if run.device.type == "cuda" else None)
    probs, ok, stats, skipped, val_loss = _gather_epoch(group, scored, stats, run.budget.bad)
    run.budget.add(skipped)
    truth = data.Y[data.va]
    metrics = evaluate(truth[ok], probs[ok])
    row = {"epoch": epoch, "lr": lr, **stats, "val_loss": val_loss, "val_images": int(ok.sum()),
           "val_img_per_s": scored["img_per_s"] * group.world, **{k: metrics[k] for k in SCALAR_KEYS},
           "threshold": metrics["threshold"], "f1_per_class": metrics["f1_per_class"],
           "ap_per_class": metrics["ap_per_class"], "skipped_images": len(run.budget.bad), "workers": group.world,
           "labels_without_positives": [data.vocab.labels[c] for c in metrics["labels_without_positives"]]}
    run.history.append(row)
    is_best = metrics["f1_samples"] > run.best_f1
    run.best_f1 = max(run.best_f1, metrics["f1_samples"])
    run.threshold = metrics["threshold"]
    state = run.state(epoch)
    meta = checkpoint.model_meta(state, {k: metrics[k] for k in SCALAR_KEYS})
    return EpochEnd(epoch, state, row, is_best, meta, data.train_df.ImageID.values[data.va], probs, ok, truth,
                    data.vocab, cfg, score=metrics["f1_samples"])


def _refit_end(run: Run, group: Group, epoch: int, stats: dict, lr: float) -> EpochEnd:
    """An epoch of a refit: nothing held out, so nothing scored; every epoch is the best so far (the last is the
    model), with the refitted run's threshold."""
    data = run.data
    nothing = {"probs": np.zeros((0, len(data.vocab)), dtype=np.float32), "ok": np.zeros(0, dtype=bool),
               "loss": math.nan, "skipped": []}
    _, _, stats, skipped, _ = _gather_epoch(group, nothing, stats, run.budget.bad)
    run.budget.add(skipped)
    row = {"epoch": epoch, "lr": lr, **stats, "val_loss": math.nan, "val_images": 0, "val_img_per_s": 0.0,
           **{k: math.nan for k in SCALAR_KEYS}, "threshold": run.threshold, "f1_per_class": [], "ap_per_class": [],
           "skipped_images": len(run.budget.bad), "workers": group.world, "labels_without_positives": [],
           "refit": run.refit}
    run.history.append(row)
    state = run.state(epoch)
    meta = checkpoint.model_meta(state, {"refit": run.refit})
    empty = np.zeros(0, dtype=object)
    return EpochEnd(epoch, state, row, True, meta, empty, nothing["probs"], nothing["ok"],
                    np.zeros((0, len(data.vocab)), dtype=np.float32), data.vocab, run.cfg, score=float(epoch))


def _epoch_line(end: EpochEnd, epochs: int) -> str:
    m = end.metrics
    if m.get("refit"):
        return (f"epoch {end.epoch}/{epochs}: train loss {m['train_loss']:.4f} ({m['train_img_per_s']:.1f} img/s); "
                "a refit: nothing held out to validate")
    return (f"epoch {end.epoch}/{epochs}: train loss {m['train_loss']:.4f} ({m['train_img_per_s']:.1f} img/s), "
            f"val loss {m['val_loss']:.4f}, F1 samples {m['f1_samples']:.4f} micro {m['f1_micro']:.4f} "
            f"macro {m['f1_macro']:.4f}, mAP {m['map']:.4f} [{m['threshold']['strategy']}]")


def _gather_epoch(group: Group, scored: dict, stats: dict, bad: dict):
    """Every rank's validation rows, training totals and unreadable images, merged in the same order everywhere."""
    mine = np.flatnonzero(scored["ok"])
    parts = group.all_gather({
        "rows": mine, "probs": scored["probs"][mine], "loss_sum": scored["loss"] * len(mine) if len(mine) else 0.0,
        "train": (stats["train_loss"] * stats["train_images"] if stats["train_images"] else 0.0,
                  stats["train_images"], stats["train_steps"], stats["train_seconds"]),
        "skipped": scored["skipped"] + [Skipped(-1, name, reason) for name, reason in bad.items()],
    })
    probs = np.full_like(scored["probs"], np.nan)
    ok = np.zeros(len(probs), dtype=bool)
    for p in parts:
        probs[p["rows"]] = p["probs"]
        ok[p["rows"]] = True
    seen = sum(p["train"][1] for p in parts)
    seconds = max(p["train"][3] for p in parts)
    merged = {"train_loss": sum(p["train"][0] for p in parts) / seen if seen else math.nan, "train_images": seen,
              "train_steps": parts[0]["train"][2], "train_seconds": seconds,
              "train_img_per_s": seen / seconds if seconds > 0 else 0.0}
    n_val = sum(len(p["rows"]) for p in parts)
    val_loss = float(sum(p["loss_sum"] for p in parts) / n_val) if n_val else math.nan
    return probs, ok, merged, [s for p in parts for s in p["skipped"]], val_loss
