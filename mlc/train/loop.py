"""The training loop, shared by local mode and Ray Train: :func:`train` runs in every training process, as rank
``group.rank`` of ``group.world`` (:mod:`mlc.train.group`), and reads top to bottom: set up the run, then per
epoch train, validate, keep the checkpoint."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

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
from mlc.model.resnet import bare_state_dict
from mlc.prediction.scores import predict_scores
from mlc.train.engine import train_one_epoch
from mlc.train.group import EpochEnd, Group
from mlc.train.outputs import SCALAR_KEYS
from mlc.train.setup import Run, setup
from mlc.train.tracking import Board


@dataclass
class Trained:
    """What a training process hands back: the history, the unreadable images met, and what it trained on."""
    history: list
    bad_images: dict
    device: torch.device
    precision: str
    resumed: bool


def train(cfg: TrainConfig, group: Group, data: RunData, *, log=print, progress: bool = True,
          on_step=None) -> Trained:
    """Train ``cfg.epochs`` epochs in this process. Each rank trains on its share of every global batch;
    validation scores are gathered, so every rank computes the same metrics over the whole validation set
    and makes the same best-epoch decision."""
    say = log if group.rank == 0 else (lambda *_: None)
    run = setup(cfg, group, data, say)
    # The store is closed however training ends; the last process on the node to close it removes it.
    with run.store if run.store is not None else contextlib.nullcontext():
        board = Board(group.tensorboard_url, log=say) if group.rank == 0 and run.start_epoch <= cfg.epochs else None
        loader = _train_loader(run, group, run.start_epoch)
        for epoch in range(run.start_epoch, cfg.epochs + 1):
            _seed_epoch(cfg.seed, epoch, group.rank)
            # The validation loader's workers start now and have their first batches ready when training ends,
            # and the next epoch's start during validation: the device never waits for a loader to start.
            val_loader = _val_loader(run, group)
            lr = run.steps.optimizer.param_groups[0]["lr"]
            stats = train_one_epoch(run.step_model, loader, run.steps, epoch=epoch, bad_images=run.budget,
                                    progress=progress and group.rank == 0, desc=f"epoch {epoch}/{cfg.epochs} train",
                                    on_step=on_step)
            loader = _train_loader(run, group, epoch + 1) if epoch < cfg.epochs else None
            end = validate(run, group, val_loader, epoch, stats, lr, progress=progress and group.rank == 0)
            group.end_epoch(end)
            say(_epoch_line(end, cfg.epochs))
            if board is not None:
                board.epoch(end.metrics)
        if board is not None:
            board.finish(run.data.vocab.labels, run.history)
    return Trained(run.history, dict(run.budget.bad), run.device, NAMES[run.steps.amp_dtype],
                   run.resumed_from is not None)


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    # Dropout's random stream is a function of (seed, epoch, rank): a resumed or restarted epoch
    # repeats exactly without saving generator states.
    torch.manual_seed((seed * 1_000_003 + epoch) * 1009 + rank)


def _train_loader(run: Run, group: Group, epoch: int) -> Loader | None:
    if epoch > run.cfg.epochs:
        return None
    return make_loader(run.train_source, run.cfg.batch_size, shuffle=True, seed=run.cfg.seed, epoch=epoch,
                       num_workers=run.loader_workers, pin_memory=run.device.type == "cuda", drop_last=run.drop_last,
                       rank=group.rank, world=group.world).start()


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
    scored = predict_scores(for_scoring(run.model, run.steps.amp_dtype), val_loader, run.device,
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
    state = checkpoint.make(model=bare_state_dict(run.model), optimizer=run.steps.optimizer,
                            scheduler=run.steps.scheduler, scaler=run.steps.scaler, epoch=epoch, best_f1=run.best_f1,
                            history=run.history, cfg=cfg, vocab=data.vocab, threshold=metrics["threshold"],
                            bad_images=run.budget.bad, tokenizer=data.tokenizer)
    meta = checkpoint.model_meta(state, {k: metrics[k] for k in SCALAR_KEYS})
    return EpochEnd(epoch, state, row, is_best, meta, data.train_df.ImageID.values[data.va], probs, ok, truth,
                    data.vocab, cfg)


def _epoch_line(end: EpochEnd, epochs: int) -> str:
    m = end.metrics
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
