"""One training step and one epoch of them, with explicit arguments: the only place that runs forward, backward
and the optimizer step. No Ray, no probing of what it was given: every batch (:class:`mlc.data.batch.Batch`)
carries the rows of its step over all ranks and the blank inputs of an empty share."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from mlc.data.batch import Batch
from mlc.logs import progress as progress_bar
from mlc.model.precision import autocast
from mlc.train.ema import Ema
from mlc.train.losses import LabelLoss


class NonFiniteLossError(FloatingPointError):
    pass


# How often (in optimizer steps) the loop reads its device-side counters back to the host: the running
# loss for the progress line and the non-finite flag. Reading a device value waits for the GPU to finish
# the queued work, so it must not happen every step; every 50 steps costs one wait per 50.
LOG_EVERY = 50


@dataclass
class StepContext:
    """What every step of a pass uses: the optimizer and schedule, precision, clipping, the world size the loss is
    normalised with, the rows per forward pass (``micro_batch``; None: the whole share at once) and, for DDP, the
    context in which a backward pass does not all-reduce (``no_sync``: the passes before a step's last)."""
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    device: torch.device
    amp_dtype: torch.dtype | None = None
    scaler: object | None = None
    clip_grad: float = 0.0
    world: int = 1
    micro_batch: int | None = None
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = LabelLoss()
    ema: Ema | None = None


@dataclass
class _Tally:
    """Device-side running totals of one pass, read back every ``log_every`` steps."""
    device: torch.device
    loss: torch.Tensor = None
    bad_steps: torch.Tensor = None
    first_bad: torch.Tensor = None
    recent: dict = field(default_factory=dict)  # step -> this rank's file names since the last check

    def __post_init__(self):
        self.loss = torch.zeros((), device=self.device)
        self.bad_steps = torch.zeros((), device=self.device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)


def train_step(model, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on this rank's share of a global batch; returns ``(rows' summed loss, non-finite flag)``,
    both on the device (no host sync).

    **Every rank takes every step.** A share may be empty, or every image of it unreadable. Such a rank still
    runs a forward and backward pass (on one blank row, in eval mode so no BatchNorm statistic moves, with zero
    loss), so its gradient all-reduce pairs with the other ranks' and DDP never desynchronises; the zero
    gradient adds nothing to the average.

    **The loss is normalised by the global batch.** Each rank's loss is its rows' summed loss (``ctx.loss``: BCE,
    ASL or focal, each row's the mean over its labels)
    times ``world / batch.global_rows``: DDP's gradient average is then exactly the gradient of the global
    batch's mean loss, however the rows are spread over the ranks, so results do not depend on the world size.

    **A share larger than ``ctx.micro_batch`` is split**: each part's loss has the same normalisation, so the
    gradients of the parts add up to the whole share's, and every backward pass but the last runs in
    ``ctx.no_sync()`` (no all-reduce until the gradient is complete). Memory per process then never grows
    when a run continues on fewer workers.

    **A non-finite loss or gradient norm skips the update on the device** (the fused optimizers take a
    ``found_inf`` flag, as under AMP's GradScaler), so no non-finite value ever reaches the weights. With fp16
    (``ctx.scaler``) the GradScaler skips the steps whose scaled gradients overflow, as it should, and only a
    non-finite loss is flagged.
    """
    ctx.optimizer.zero_grad(set_to_none=True)
    parts = batch.split(ctx.micro_batch)
    rows = torch.zeros((), device=ctx.device)
    found = torch.zeros((), dtype=torch.bool, device=ctx.device)
    for k, part in enumerate(parts):
        with contextlib.nullcontext() if k == len(parts) - 1 else ctx.no_sync():
            part_rows, loss = _part_loss(model, part, ctx)
            found = found | ~torch.isfinite(loss.detach())
            (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()
        rows = rows + part_rows
    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)  # clip the true gradients, not the scaled ones
    params = [p for g in ctx.optimizer.param_groups for p in g["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, ctx.clip_grad if ctx.clip_grad > 0 else math.inf, foreach=True)
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)  # skips the update itself when the scaled gradients overflowed
        ctx.scaler.update()
    else:
        found = found | ~torch.isfinite(norm)
        _step_unless(ctx.optimizer, found)
    if ctx.ema is not None:
        # Steps skipped for a non-finite value leave the average alone. Under fp16 the scaler's own skips are
        # averaged in: the weights did not move, so the average only drifts towards them (no wait to find out).
        ctx.ema.update(found if ctx.scaler is None else None)
    if ctx.scheduler is not None:
        ctx.scheduler.step()
    return rows, found


def _part_loss(model, part: Batch, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows' summed loss, the loss to differentiate)`` of one forward pass."""
    if not len(part):
        zero = _zero_loss(model, part.reads.blank(ctx.device), ctx)
        return zero.detach(), zero
    with autocast(ctx.device, ctx.amp_dtype):
        logits = model(*part.inputs(ctx.device))
    y = part.targets_on(ctx.device)
    rows = ctx.loss(logits.float(), y)
    return rows.detach(), rows * (ctx.world / max(1, part.global_rows))


def _step_unless(optimizer, found: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``found`` (a device flag): on the device where the optimizer can skip there."""
    if optimizer.defaults.get("fused"):
        # Fused Adam/AdamW/SGD read ``found_inf`` in step() and skip the whole update on the device.
        optimizer.found_inf = found.float()
        optimizer.step()
        del optimizer.found_inf
    elif not found.item():  # no on-device skip in this optimizer: check on the host
        optimizer.step()


def _zero_loss(model, blank: tuple, ctx: StepContext) -> torch.Tensor:
    """A loss of exactly zero that still runs the whole network: the step of a rank with no usable image.
    Eval mode, so BatchNorm's running statistics do not see the blank row and dropout draws nothing; the
    backward pass still reaches every trainable parameter, so DDP's all-reduces fire as on the other ranks."""
    was = model.training
    model.eval()
    try:
        with autocast(ctx.device, ctx.amp_dtype):
            return model(*blank).float().sum() * 0.0
    finally:
        model.train(was)


@dataclass
class EpochHooks:
    """What the loop does around each step of an epoch: ``seed(step)`` the random stream the step draws from
    (dropout: a function of the step alone, so a run resumed at any step repeats it), and ``after(step, totals)``
    what follows it (notices, checkpoints, fault drills), True to stop the epoch there."""
    seed: Callable[[int], int] | None = None
    after: Callable[[int, Callable[[], dict]], bool] | None = None


def train_one_epoch(model, batches, ctx: StepContext, *, epoch: int, bad_images=None, progress: bool = True,
                    desc: str = "", hooks: EpochHooks = EpochHooks(), first_step: int = 0, so_far: dict | None = None,
                    log_every: int = LOG_EVERY) -> dict:
    """Train on every batch of ``batches`` (this rank's shares of one epoch's global batches from step
    ``first_step``, carrying on from the totals ``so_far`` of the steps before it); returns mean loss, image
    count, steps, throughput, and ``stopped`` (a hook ended the epoch early).

    Unreadable images are counted and named in ``bad_images`` (:class:`mlc.data.run_data.BadImageBudget`).
    The device-side totals are read every ``log_every`` steps: a step whose loss or gradient was not finite
    then raises :class:`NonFiniteLossError` naming it and its images (its update was skipped).
    """
    model.train()
    before = {"loss_sum": 0.0, "images": 0, "steps": 0, "seconds": 0.0, **(so_far or {})}
    tally = _Tally(ctx.device)
    seen = steps = 0
    start = time.perf_counter()

    def totals() -> dict:
        _check_finite(tally, epoch)
        return {"loss_sum": before["loss_sum"] + float(tally.loss.item()), "images": before["images"] + seen,
                "steps": before["steps"] + steps, "seconds": before["seconds"] + time.perf_counter() - start}

    stopped = False
    bar = progress_bar(batches, desc=desc or f"train {epoch}", enabled=progress)
    for batch in bar:
        step = first_step + steps
        if bad_images is not None and batch.skipped:
            bad_images.add(batch.skipped)
        if hooks.seed is not None:
            _seed(ctx.device, hooks.seed(step))
        rows, found = train_step(model, batch, ctx)
        _count(tally, rows, found, step, batch.names)
        seen += len(batch)
        steps += 1
        if steps % log_every == 0:
            _check_finite(tally, epoch)
            if progress:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{tally.loss.item() / max(seen, 1):.4f}", img_s=f"{seen / max(elapsed, 1e-9):.1f}")
        if hooks.after is not None and hooks.after(step + 1, totals):
            stopped = True
            break
    out = totals()
    return {"train_loss": out["loss_sum"] / out["images"] if out["images"] else math.nan,
            "train_images": out["images"], "train_steps": out["steps"], "train_seconds": out["seconds"],
            "train_img_per_s": out["images"] / out["seconds"] if out["seconds"] > 0 else 0.0,
            "train_loss_sum": out["loss_sum"], "stopped": stopped}


def _seed(device: torch.device, seed: int) -> None:
    """Seed the generators a step draws from: the CPU's and the step's CUDA device's. torch.manual_seed would seed
    every CUDA device too, and costs 95 us a call against 1 us (measured on the dev CPU): on a GPU step of
    ~20 ms that is the difference between 0.5% and nothing."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)


def _count(tally: _Tally, rows: torch.Tensor, found: torch.Tensor, step: int, names: list) -> None:
    tally.loss += rows
    tally.bad_steps += found.float()
    tally.first_bad = torch.where(found & (tally.first_bad < 0), torch.full_like(tally.first_bad, step),
                                  tally.first_bad)
    tally.recent[step] = names


def _check_finite(tally: _Tally, epoch: int) -> None:
    if not tally.bad_steps.item():
        tally.recent.clear()
        return
    step = int(tally.first_bad.item())
    raise NonFiniteLossError(
        f"epoch {epoch} step {step + 1}: the loss or its gradient is not finite; that update was skipped, so the "
        "weights are still finite, and the run stops without saving. Lower --lr, keep --clip-grad on, try "
        f"--amp off, or check this batch's images: {tally.recent.get(step, [])[:8]}")


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to 0 at ``total_steps``."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return f


def make_optimizer(params, name: str, lr: float, momentum: float = 0.9, device: torch.device | None = None):
    """AdamW or Nesterov SGD, fused where torch has a fused kernel for the device (CUDA, and CPU since torch
    2.4): one kernel for the whole update, and the on-device ``found_inf`` skip the loop relies on."""
    fused = True if device is not None and device.type in ("cuda", "cpu") else None
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, fused=fused)
    raise ValueError(f"unknown optimizer {name!r}; use adamw or sgd")
