"""The training loop, shared by local mode and Ray Train, and local mode's entry point ``fit``.

``train_loop`` runs in every training process. What differs between one process and a Ray worker
group is behind a small ``group`` object: its rank and world size, the device, how the model is
wrapped (DDP), how objects are gathered across ranks, where the resume state comes from, and
where each epoch's checkpoint goes. ``LocalGroup`` is the one-process group; ``mlc.distributed.train``
has the Ray one.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from mlc.io import storage
from mlc.io.lock import hold
from mlc.train.checkpoint import load_training_state, save_model, save_training_state
from mlc.config import TrainConfig
from mlc.data.datasets import BadImageBudget
from mlc.data.loader import StartedLoader, make_loader
from mlc.data.demo import with_demo_data
from mlc.model.device import available_cpus, pick_device, prepare_device
from mlc.train.engine import make_optimizer, predict_scores, resolve_loader_workers, train_one_epoch, warmup_cosine
from mlc.data.labels import LabelVocab
from mlc.model.fusion import build, for_scoring, text_lr_scale, uses_captions, uses_images
from mlc.model.resnet import bare_state_dict, trainable_parameter_groups
from mlc.train.outputs import SCALAR_KEYS, finish, write_metrics
from mlc.model.precision import NAMES, needs_grad_scaler, pick_amp_dtype
from mlc.train.runs import latest_epoch_checkpoint
from mlc.train.submission import write_predictions
from mlc.eval.thresholds import ThresholdChoice, evaluate
from mlc.data.tokenizer import Tokenizer
from mlc.model.compiling import decide as decide_compile
from mlc.train.feed import RunData, prepare_data, resolve_inputs, run_tables  # noqa: F401 - the API's names

# Everything a local run writes under --output; --fresh removes these first so nothing stale survives.
OUTPUTS = ("checkpoint", "best", "metrics.json", "predictions.csv", "probabilities.csv", "plots", "config.json",
           "tensorboard")


class ConfigMismatch(ValueError):
    pass


@dataclass
class EpochEnd:
    """One finished epoch, as every rank sees it (the gathered validation scores included)."""
    epoch: int
    state: dict          # the resumable training state (checkpoint.save_training_state's object)
    row: dict            # this epoch's line of the history
    is_best: bool
    model_meta: dict     # meta.json of this epoch's model
    val_ids: np.ndarray
    val_probs: np.ndarray
    val_ok: np.ndarray
    val_truth: np.ndarray
    vocab: LabelVocab
    cfg: TrainConfig


class LocalGroup:
    """One process: the first GPU or the CPU; checkpoints in ``<output>/checkpoint``, best model in ``best/``."""
    rank, world = 0, 1

    def __init__(self, out: str, on_start=None, fresh: bool = False):
        self.out, self.on_start, self.fresh = out, on_start, fresh
        self.ckpt_url, self.best_url = storage.join(out, "checkpoint"), storage.join(out, "best")
        self.tensorboard_url = storage.join(out, "tensorboard")
        self.device = pick_device()

    def wrap(self, model):
        return model

    def all_gather(self, obj) -> list:
        return [obj]

    def load_state(self) -> tuple[dict | None, str]:
        if self.fresh:  # the old run is replaced once every check has passed (on_start), never read
            return None, self.ckpt_url
        state = load_training_state(self.ckpt_url)
        if state is not None:
            return state, self.ckpt_url
        # A Ray Train run's folder holds one epoch_NNNN/ per kept checkpoint, each with local mode's state.pt:
        # local mode continues the latest of them.
        latest = latest_epoch_checkpoint(self.out)
        return (load_training_state(latest), latest) if latest else (None, self.ckpt_url)

    def end_epoch(self, e: EpochEnd) -> None:
        if e.is_best:
            save_model(self.best_url, e.state["model"], e.vocab, e.model_meta)
            # The best epoch's validation scores and predictions, to plot and to score later.
            write_predictions(self.best_url, e.val_ids, e.val_probs, e.val_ok, e.vocab,
                              ThresholdChoice.from_dict(e.model_meta["threshold"]), prefix="val_", truth=e.val_truth)
        save_training_state(self.ckpt_url, e.state)
        write_metrics(self.out, e.state["history"], e.cfg, complete=False)


def fit(cfg: TrainConfig, *, fresh: bool = False, log=print, progress: bool = True) -> dict:
    """Local mode: train in this process, then write every output under ``cfg.output``."""
    t_start = time.perf_counter()
    given = cfg  # as the caller gave it: data=None (the demo set) stays None in config.json
    cfg = with_demo_data(cfg, log)
    storage.check_writable(cfg.output)
    from mlc.train.replay import write_config

    def start(resuming: bool) -> None:
        # Called once every check that can run before training has passed (tables, images found, the resume
        # check, the weights): only now does --fresh replace the previous run.
        if fresh:
            old = [n for n in OUTPUTS if storage.exists(storage.join(cfg.output, n))]
            if old:
                log(f"--fresh: replacing the previous run in {cfg.output} ({', '.join(old)})")
            for name in old:
                storage.remove(storage.join(cfg.output, name), recursive=True)
        if not resuming:  # a resume rewrites config.json only once it has succeeded (below)
            write_config(cfg.output, "train", local=True, train=given)

    with hold(cfg.output, what="a training run", log=log):
        group = LocalGroup(cfg.output, on_start=start, fresh=fresh)
        result = train_loop(cfg, group, log=log, progress=progress)
        summary = finish(cfg, cfg.output, result["data"], result["history"], result["bad_images"],
                         device=group.device, precision=result["precision"], t_start=t_start, log=log,
                         progress=progress)
        if result["resumed"]:
            write_config(cfg.output, "train", local=True, train=given)
        return summary


def check_resumable(state: dict, cfg: TrainConfig, vocab: LabelVocab, url: str) -> None:
    saved = TrainConfig.from_dict(state["config"])
    if saved.inputs == "auto":  # saved before --inputs existed, when every network read images only
        saved = saved.replace(inputs="image")
    diff = cfg.differences(saved)
    if diff:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ConfigMismatch(f"{url} holds a run with other settings ({listed}); rerun with the same flags to "
                             "resume, add --fresh to start over, or choose another --output/--name")
    if state["labels"] != vocab.labels:
        raise ConfigMismatch(f"{url} was trained on labels {state['labels']}, the data now has {vocab.labels}; "
                             "use --fresh or another --output")


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    # Dropout's random stream is a function of (seed, epoch, rank): a resumed or restarted epoch
    # repeats exactly without saving generator states.
    torch.manual_seed((seed * 1_000_003 + epoch) * 1009 + rank)


def train_loop(cfg: TrainConfig, group, *, log=print, progress: bool = True, on_step=None) -> dict:
    """Train ``cfg.epochs`` epochs in this process as rank ``group.rank`` of ``group.world``.

    Returns the history, the run's data and the unreadable images met. Each rank trains on its share
    of every global batch (``RankBatches``); validation scores are gathered so every rank computes the same
    metrics over the whole validation set and makes the same best-epoch decision.
    """
    rank0 = group.rank == 0
    say = log if rank0 else (lambda *_: None)
    data = prepare_data(cfg, say)
    cfg = cfg.replace(inputs=data.inputs)  # saved resolved: a checkpoint says what its network reads
    state, source = group.load_state()
    resumed = state is not None
    if state is not None:
        check_resumable(state, cfg, data.vocab, source)
        if state.get("tokenizer"):
            data.use_tokenizer(Tokenizer.from_dict(state["tokenizer"], source))

    device = group.device
    # Decided here, in the process that trains, from its own device and CPUs (a Ray driver on a small head
    # node knows neither).
    amp_dtype = pick_amp_dtype(cfg.amp, device, kind="train", unfrozen_depth=cfg.unfrozen_depth,
                               image_size=cfg.image_size, log=say)
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(amp_dtype) else None
    cpus = process_cpus(group)
    loader_workers = resolve_loader_workers(cfg.loader_workers, cpus, device)
    prepare_device(device)
    say(f"device {device}, precision {NAMES[amp_dtype]}{' with loss scaling' if scaler else ''}, "
        f"{loader_workers} loader workers per process ({cpus} CPUs), torch {torch.get_num_threads()} threads")
    torch.manual_seed(cfg.seed)  # the same initial head on every rank
    model = build(cfg.inputs, len(data.vocab), num_tokens=data.tokenizer.size if data.tokenizer else 0,
                  unfrozen_depth=cfg.unfrozen_depth, dropout=cfg.dropout,
                  weights=state["model"] if state else cfg.weights, log=say, freeze_bn=cfg.freeze_bn)
    model.to(device, memory_format=torch.channels_last)
    if rank0 and getattr(group, "on_start", None):
        group.on_start(resumed)  # the weights loaded too: every check before training has passed
    bare = model
    model = group.wrap(model)
    # Each rank compiles its own copy and trains its share of the images: the share is what pays the compile back.
    planned = len(data.tr) * max(0, cfg.epochs - _first_epoch(state) + 1) // group.world
    compiled, why = decide_compile(cfg.compile, device.type, planned, cfg.unfrozen_depth)
    say(why)
    if compiled:
        # Compiled around DDP, as torch recommends (DDP's buckets become graph breaks); ``bare`` stays the
        # plain module that checkpoints and validation use.
        model = torch.compile(model)
    # --batch-size is global: the rows of one optimizer step over all ranks. The steps, and so the
    # learning-rate schedule, depend on the data and the batch size only, never on the world size. A set
    # smaller than one batch trains as one batch of everything.
    n_train = len(data.tr)
    drop_last = n_train >= cfg.batch_size
    steps_per_epoch = n_train // cfg.batch_size if drop_last else 1
    total_steps = steps_per_epoch * cfg.epochs
    text_lr = None
    if uses_captions(cfg.inputs):
        text_lr = cfg.lr * text_lr_scale(total_steps)
        say(f"caption embedding learning rate {text_lr:.3g} ({text_lr / cfg.lr:.3g} x --lr over {total_steps} steps)")
    optimizer = make_optimizer(trainable_parameter_groups(bare, cfg.weight_decay, text_lr=text_lr),
                               cfg.optimizer, cfg.lr, cfg.momentum, device=device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, max(1, int(cfg.warmup_epochs * steps_per_epoch))))

    history, best_f1, start_epoch = [], -math.inf, 1
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, best_f1, start_epoch = state["history"], state["best_f1"], state["epoch"] + 1
        if start_epoch > cfg.epochs:
            say(f"resuming: {source} has finished all {state['epoch']} epochs; writing the outputs")
        else:
            say(f"resuming from {source}: epoch {state['epoch']} done, continuing at epoch {start_epoch}")

    va, Y = data.va, data.Y
    train_ds, val_ds, store = run_tables(cfg, data, uses_images(cfg.inputs), log=say)
    # The store is closed however training ends; the last process on the node to close it removes it.
    with store if store is not None else contextlib.nullcontext():
        if cfg.gpu_decode and device.type != "cuda":
            say("warning: --gpu-decode on a CPU device: JPEGs are decoded in the training process, not in "
                "parallel")
        budget = BadImageBudget(len(data.train_df), cfg.max_bad_fraction, log=say)
        if state is not None:
            budget.bad.update(state.get("bad_images", {}))
        pin = device.type == "cuda"
        val_ids = data.train_df.ImageID.values[va]

        def train_loader(epoch):
            return StartedLoader(make_loader(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                                             num_workers=loader_workers, pin_memory=pin, drop_last=drop_last,
                                             rank=group.rank, world=group.world))

        # Scoring batches are each rank's training share: the shapes cuDNN has already timed its algorithms
        # for, not a second set to time in the first epoch (predict_scores pads the last one to it on a GPU).
        val_batch = max(1, math.ceil(cfg.batch_size / group.world))
        next_loader = train_loader(start_epoch) if start_epoch <= cfg.epochs else None
        board = None
        if rank0 and start_epoch <= cfg.epochs:
            from mlc.train.tracking import Board
            board = Board(group.tensorboard_url, log=say)
        for epoch in range(start_epoch, cfg.epochs + 1):
            _seed_epoch(cfg.seed, epoch, group.rank)
            loader = next_loader
            # The validation loader's workers start now and have their first batches ready when training ends,
            # and the next epoch's start during validation: the device never waits for a loader to start.
            val_loader = StartedLoader(make_loader(val_ds, val_batch, shuffle=False, num_workers=loader_workers,
                                                   pin_memory=pin, rank=group.rank, world=group.world))
            lr = optimizer.param_groups[0]["lr"]
            stats = train_one_epoch(model, loader, optimizer, scheduler, device, epoch=epoch, amp_dtype=amp_dtype,
                                    clip_grad=cfg.clip_grad, bad_images=budget, progress=progress and rank0,
                                    desc=f"epoch {epoch}/{cfg.epochs} train", on_step=on_step, world=group.world,
                                    scaler=scaler)
            next_loader = train_loader(epoch + 1) if epoch < cfg.epochs else None
            # The bare module scores: ranks hold different numbers of validation batches, and DDP's forward
            # would wait for the others.
            scored = predict_scores(for_scoring(bare, amp_dtype), val_loader, device, amp_dtype=amp_dtype,
                                    progress=progress and rank0, desc=f"epoch {epoch}/{cfg.epochs} validate",
                                    pad_to=val_batch if device.type == "cuda" else None)
            probs, ok, stats, skipped, val_loss = _gather_epoch(group, scored, stats, budget)
            budget.add(skipped)
            metrics = evaluate(Y[va][ok], probs[ok])
            row = {"epoch": epoch, "lr": lr, **stats, "val_loss": val_loss, "val_images": int(ok.sum()),
                   "val_img_per_s": scored["img_per_s"] * group.world, **{k: metrics[k] for k in SCALAR_KEYS},
                   "threshold": metrics["threshold"], "f1_per_class": metrics["f1_per_class"],
                   "ap_per_class": metrics["ap_per_class"], "skipped_images": len(budget.bad), "workers": group.world,
                   "labels_without_positives": [data.vocab.labels[c] for c in metrics["labels_without_positives"]]}
            history.append(row)
            is_best = metrics["f1_samples"] > best_f1
            best_f1 = max(best_f1, metrics["f1_samples"])
            weights = bare_state_dict(bare)
            state = {"model": weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "epoch": epoch, "best_f1": best_f1, "history": history, "config": cfg.to_dict(),
                     "labels": data.vocab.labels, "threshold": metrics["threshold"], "bad_images": dict(budget.bad),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "tokenizer": data.tokenizer.to_dict() if data.tokenizer else None}
            meta = {"config": cfg.to_dict(), "threshold": metrics["threshold"], "epoch": epoch,
                    "metrics": {k: metrics[k] for k in SCALAR_KEYS}, "tokenizer": state["tokenizer"]}
            group.end_epoch(EpochEnd(epoch, state, row, is_best, meta, val_ids, probs, ok, Y[va], data.vocab, cfg))
            say(f"epoch {epoch}/{cfg.epochs}: train loss {stats['train_loss']:.4f} "
                f"({stats['train_img_per_s']:.1f} img/s), val loss {row['val_loss']:.4f}, "
                f"F1 samples {metrics['f1_samples']:.4f} micro {metrics['f1_micro']:.4f} "
                f"macro {metrics['f1_macro']:.4f}, mAP {metrics['map']:.4f} [{metrics['threshold']['strategy']}]")
            if board is not None:
                board.epoch(row)
        if board is not None:
            best = max(history, key=lambda r: r["f1_samples"])
            board.per_class(data.vocab.labels, best["f1_per_class"], best.get("ap_per_class"), best["epoch"])
            board.close()
        return {"history": history, "data": data, "bad_images": dict(budget.bad), "device": device,
                "precision": NAMES[amp_dtype], "resumed": resumed}



def _first_epoch(state: dict | None) -> int:
    return state["epoch"] + 1 if state is not None else 1


def process_cpus(group) -> int:
    """CPUs this training process may use: what its group reserved for it (Ray's reservation for a Ray
    worker), else the process's CPU affinity."""
    cpus = getattr(group, "cpus", None)
    return int(cpus) if cpus else available_cpus()


def _gather_epoch(group, scored: dict, stats: dict, budget: BadImageBudget):
    """Every rank's validation rows, training totals and unreadable images, merged in the same order everywhere."""
    mine = np.flatnonzero(scored["ok"])
    parts = group.all_gather({
        "rows": mine, "probs": scored["probs"][mine], "loss_sum": scored["loss"] * len(mine) if len(mine) else 0.0,
        "train": (stats["train_loss"] * stats["train_images"] if stats["train_images"] else 0.0,
                  stats["train_images"], stats["train_steps"], stats["train_seconds"]),
        "skipped": scored["skipped"] + _as_skipped(budget.bad),
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
    skipped = [s for p in parts for s in p["skipped"]]
    n_val = sum(len(p["rows"]) for p in parts)
    val_loss = float(sum(p["loss_sum"] for p in parts) / n_val) if n_val else math.nan
    return probs, ok, merged, skipped, val_loss


def _as_skipped(bad: dict) -> list:
    from mlc.data.datasets import Skipped
    return [Skipped(-1, name, reason) for name, reason in bad.items()]
