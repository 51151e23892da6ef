"""A training process's run, built once (:func:`setup`): the model, how it steps, its data sources and where it
resumes, in one :class:`Run` that the loop (:mod:`mlc.train.loop`) reads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mlc.config import TrainConfig, uses_captions
from mlc.data.run_data import BadImageBudget, RunData, open_sources
from mlc.data.sources import RowSource
from mlc.data.loader import resolve_loader_workers
from mlc.data.tokenizer import Tokenizer
from mlc.model import checkpoint
from mlc.model.checkpoint import check_resumable
from mlc.model.compiling import decide as decide_compile
from mlc.model.device import available_cpus, prepare_device
from mlc.model.fusion import build, text_lr_scale
from mlc.model.precision import NAMES, needs_grad_scaler, pick_amp_dtype
from mlc.model.resnet import bare_state_dict, trainable_parameter_groups
from mlc.train.ema import Ema
from mlc.train.engine import StepContext, make_optimizer, warmup_cosine
from mlc.train.group import Group
from mlc.train.interrupts import interruption
from mlc.train.losses import describe as describe_loss, make_loss
from mlc.train.refit import source as refit_source


@dataclass
class Run:
    """Everything one training process holds. ``model`` is the bare module (checkpoints, validation);
    ``steps.optimizer`` etc. drive ``step_model`` (DDP- and/or compile-wrapped). ``start_epoch`` is where
    training continues; ``history`` and ``best_f1`` are the epochs before it."""
    cfg: TrainConfig
    data: RunData
    model: torch.nn.Module
    step_model: torch.nn.Module
    steps: StepContext
    train_source: RowSource
    val_source: RowSource
    store: object | None
    budget: BadImageBudget
    loader_workers: int
    steps_per_epoch: int
    drop_last: bool
    start_epoch: int = 1
    start_step: int = 0          # global batches of start_epoch already trained (a checkpoint inside it)
    so_far: dict = field(default_factory=dict)  # that epoch's running totals before start_step
    best_f1: float = -math.inf
    history: list = field(default_factory=list)
    threshold: dict | None = None  # the last validated epoch's
    interruptions: list = field(default_factory=list)
    pending: dict | None = None  # this restart's interruption record, completed at its first step
    resumed_from: str | None = None
    refit: dict | None = None  # --refit: the run whose threshold is kept (mlc.train.refit.source)

    @property
    def device(self) -> torch.device:
        return self.steps.device

    def state(self, epoch: int, *, step: int = 0, so_far: dict | None = None, reason: str = "epoch") -> dict:
        """The checkpoint of this run once ``epoch`` epochs and ``step`` global batches of the next are done."""
        return checkpoint.make(model=bare_state_dict(self.model), optimizer=self.steps.optimizer,
                               scheduler=self.steps.scheduler, scaler=self.steps.scaler, epoch=epoch, step=step,
                               so_far=so_far, reason=reason, best_f1=self.best_f1, history=self.history, cfg=self.cfg,
                               vocab=self.data.vocab, threshold=self.threshold, bad_images=self.budget.bad,
                               tokenizer=self.data.tokenizer, interruptions=self.interruptions,
                               micro_batch=self.steps.micro_batch, table_key=self.data.key,
                               ema=self.steps.ema.to_dict() if self.steps.ema is not None else None)

    def scored_model(self) -> torch.nn.Module:
        """The bare module validation scores: the weight average's copy with --ema, else the model itself."""
        return self.steps.ema.averaged_copy(self.model) if self.steps.ema is not None else self.model


def setup(cfg: TrainConfig, group: Group, data: RunData, log) -> Run:
    """The run of this process, rank ``group.rank`` of ``group.world``, resumed from ``group.latest()`` when
    there is a state there."""
    cfg = cfg.replace(inputs=data.inputs)  # saved resolved: a checkpoint says what its network reads
    state, where = group.latest()
    if state is not None:
        check_resumable(state, cfg, data.vocab, where, data.key)
        if state["tokenizer"]:
            data.use_tokenizer(Tokenizer.from_dict(state["tokenizer"], where))
    steps = _precision(cfg, group, log)
    # Rows per forward pass: as set, else as the run first resolved it, else the share at this world size, so
    # that a resume on fewer workers accumulates instead of growing each process's batch.
    steps.micro_batch = cfg.micro_batch or (state or {}).get("micro_batch") or math.ceil(cfg.batch_size / group.world)
    workers = resolve_loader_workers(cfg.loader_workers, group.cpus or available_cpus(), steps.device)
    log(f"device {steps.device}, precision {NAMES[steps.amp_dtype]}{' with loss scaling' if steps.scaler else ''}, "
        f"{workers} loader workers per process ({group.cpus or available_cpus()} CPUs), torch "
        f"{torch.get_num_threads()} threads")
    model = _model(cfg, data, state, steps.device, log)
    # --batch-size is global: the rows of one optimizer step over all ranks. The steps, and so the learning-rate
    # schedule, depend on the data and the batch size only, never on the world size. A set smaller than one
    # batch trains as one batch of everything.
    drop_last = len(data.tr) >= cfg.batch_size
    per_epoch = len(data.tr) // cfg.batch_size if drop_last else 1
    steps.optimizer, steps.scheduler = _optimizer(cfg, model, per_epoch, steps.device, log)
    steps.loss = make_loss(cfg, data.Y[data.tr])
    log(describe_loss(steps.loss))
    train_source, val_source, store = open_sources(cfg, data, log, decoders=max(1, workers))
    run = Run(cfg, data, model, _step_model(cfg, group, model, state, len(data.tr), steps, log), steps, train_source,
              val_source, store, BadImageBudget(len(data.train_df), cfg.max_bad_fraction, log=log), workers,
              per_epoch, drop_last)
    # After DDP's wrap has given every rank rank 0's weights; a resume loads the saved average over it.
    steps.ema = Ema(model, cfg.ema) if cfg.ema > 0 else None
    if cfg.refit:
        run.refit = refit_source(cfg.refit)
        run.threshold = run.refit["threshold"]
        log(f"refit: {per_epoch * cfg.epochs} steps on every labelled row; the threshold ({run.threshold['strategy']})"
            f" is {run.refit['from']}'s, chosen on that run's validation split at its best epoch {run.refit['epoch']}")
    if state is not None:
        _restore(run, state, where, group.progress_url, log)
    return run


def _precision(cfg: TrainConfig, group: Group, log) -> StepContext:
    """The step's device and precision, decided here, in the process that trains, from its own device (a Ray
    driver on a small head node knows neither)."""
    device = group.device
    prepare_device(device)
    amp_dtype = pick_amp_dtype(cfg.amp, device, kind="train", unfrozen_depth=cfg.unfrozen_depth,
                               image_size=cfg.image_size, log=log)
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(amp_dtype) else None
    return StepContext(None, None, device, amp_dtype, scaler, cfg.clip_grad, group.world)


def _model(cfg: TrainConfig, data: RunData, state: dict | None, device, log) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)  # the same initial head on every rank
    model = build(cfg.inputs, len(data.vocab), model=cfg.model,
                  num_tokens=data.tokenizer.size if data.tokenizer else 0, unfrozen_depth=cfg.unfrozen_depth,
                  dropout=cfg.dropout,
                  weights=state["model"] if state else cfg.weights, log=log, freeze_bn=cfg.freeze_bn)
    return model.to(device, memory_format=torch.channels_last)


def _step_model(cfg: TrainConfig, group: Group, model, state: dict | None, n_train: int, steps: StepContext,
                log) -> torch.nn.Module:
    """The module the steps run: DDP across the group, compiled when it pays (each rank compiles its own copy
    and trains its share of the images: the share is what pays the compile back). ``steps.no_sync`` becomes
    DDP's, for the passes of a split share before its last."""
    wrapped = group.wrap(model)
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        steps.no_sync = wrapped.no_sync
    left = max(0, cfg.epochs - (state["epoch"] if state else 0))
    compiled, why = decide_compile(cfg.compile, group.device.type, n_train * left // group.world, cfg.unfrozen_depth)
    log(why)
    # Compiled around DDP, as torch recommends (DDP's buckets become graph breaks).
    return torch.compile(wrapped) if compiled else wrapped


def _optimizer(cfg: TrainConfig, model, steps_per_epoch: int, device, log):
    total = steps_per_epoch * cfg.epochs
    text_lr = None
    if uses_captions(cfg.inputs):
        text_lr = cfg.lr * text_lr_scale(total)
        log(f"caption embedding learning rate {text_lr:.3g} ({text_lr / cfg.lr:.3g} x --lr over {total} steps)")
    optimizer = make_optimizer(trainable_parameter_groups(model, cfg.weight_decay, text_lr=text_lr),
                               cfg.optimizer, cfg.lr, cfg.momentum, device=device)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, max(1, int(cfg.warmup_epochs * steps_per_epoch))))
    return optimizer, schedule


def _restore(run: Run, state: dict, where: str, progress_url: str | None, log) -> None:
    """Continue from ``state``: optimizer, schedule and loss-scaler states, the history, the unreadable images."""
    run.steps.optimizer.load_state_dict(state["optimizer"])
    run.steps.scheduler.load_state_dict(state["scheduler"])
    if run.steps.scaler is not None and state["scaler"]:
        run.steps.scaler.load_state_dict(state["scaler"])
    run.history, run.best_f1, run.threshold = state["history"], state["best_f1"], state["threshold"]
    run.start_epoch, run.start_step, run.so_far = state["epoch"] + 1, state["step"], state["so_far"]
    if run.steps.ema is not None and state["ema"] is not None:
        run.steps.ema.load(state["ema"])
    run.budget.bad.update(state["bad_images"])
    run.interruptions = list(state["interruptions"])
    run.pending = interruption(state, run.steps_per_epoch, progress_url)
    run.resumed_from = where
    at = f"epoch {state['epoch']}" + (f" and {state['step']} steps of epoch {state['epoch'] + 1}" if state["step"] else "")
    log(f"restored {at} from {where}: weights, {'weight average, ' if state['ema'] else ''}optimizer, schedule, "
        "history")
