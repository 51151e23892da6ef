"""One epoch of training and one pass of scoring, with explicit arguments and no Ray imports.

Local mode and Ray Train call the same two functions.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from mlc.logs import progress as progress_bar
from mlc.model.precision import autocast
from mlc.model.fusion import head
from mlc.data.loader import batch_to_device
from mlc.data.transforms import blank_inputs, input_shape


class NonFiniteLossError(FloatingPointError):
    pass


# How often (in optimizer steps) the loop reads its device-side counters back to the host: the running
# loss for the progress line and the non-finite flag. Reading a device value waits for the GPU to finish
# the queued work, so it must not happen every step; every 50 steps costs one wait per 50.
LOG_EVERY = 50


def train_one_epoch(model, loader, optimizer, scheduler, device, *, epoch: int, amp_dtype=None,
                    clip_grad: float = 0.0, bad_images=None, progress: bool = True, desc: str = "",
                    on_step=None, world: int = 1, scaler=None, log_every: int = LOG_EVERY) -> dict:
    """Train for one pass over ``loader``; returns mean loss, image count and throughput.

    **Every rank takes every step.** The loader yields this rank's share of each global batch
    (:class:`mlc.data.loader.RankBatches`); a share may be empty, or every image of it unreadable. Such a rank
    still runs a forward and backward pass (on one blank image, in eval mode so no BatchNorm statistic
    moves, with zero loss), so its gradient all-reduce pairs with the other ranks' and DDP never
    desynchronises; the zero gradient adds nothing to the average.

    **The loss is normalised by the global batch.** Each rank's loss is its rows' summed BCE (mean over
    labels) times ``world / rows of the global batch``: DDP's gradient average is then exactly the
    gradient of the global batch's mean loss, however the rows are spread over the ranks, so results do
    not depend on the world size. An unreadable image adds nothing (it is counted and named).

    **No host sync per step.** The loss is accumulated on the device and read every ``log_every``
    steps. A non-finite loss or gradient norm skips that step's update on the device (the fused
    optimizers take a ``found_inf`` flag, as under AMP's GradScaler), so no non-finite value ever
    reaches the weights; the flag is read at the next log point, which raises NonFiniteLossError naming
    the first bad step and its images. With fp16 (``scaler``) the GradScaler skips the steps whose scaled
    gradients overflow, as it should, and only a non-finite loss stops the run.

    ``on_step(epoch, step)``, when given, is called after each optimizer step (fault drills).
    """
    model.train()
    sizes = getattr(getattr(loader, "batch_sampler", None), "global_sizes", None)
    skip_on_device = _supports_found_inf(optimizer)
    loss_sum = torch.zeros((), device=device)
    bad_steps = torch.zeros((), device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    recent: dict = {}  # step -> this rank's image indices since the last check, to name a bad batch
    seen = steps = 0
    blank = None
    start = time.perf_counter()
    bar = progress_bar(loader, desc=desc or f"train {epoch}", enabled=progress)
    for batch in bar:
        if bad_images is not None and batch.skipped:
            bad_images.add(batch.skipped)
        inputs, y, index, lost = batch_to_device(batch, device)
        if lost and bad_images is not None:
            bad_images.add(lost)
        n = len(index)
        global_rows = sizes[steps] if sizes is not None else len(batch) * world
        if n:
            blank = input_shape(inputs)  # the shape only: holding the tensors would keep a batch alive
            with autocast(device, amp_dtype):
                logits = model(*inputs)
            rows = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="sum") / y.shape[1]
            loss = rows * (world / max(1, global_rows))
            loss_sum += rows.detach()
            recent[steps] = index
        else:
            loss = _zero_loss(model, loader, device, amp_dtype, blank)
        found = ~torch.isfinite(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        else:
            loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else math.inf, foreach=True)
        if scaler is not None:
            scaler.step(optimizer)  # skips the update itself when the scaled gradients overflowed
            scaler.update()
        else:
            found = found | ~torch.isfinite(norm)
            if skip_on_device:
                optimizer.found_inf = found.float()
                optimizer.step()
                del optimizer.found_inf
            elif not found.item():  # no on-device skip in this optimizer: check on the host
                optimizer.step()
        if scheduler is not None:
            scheduler.step()
        bad_steps += found.float()
        first_bad = torch.where(found & (first_bad < 0), torch.full_like(first_bad, steps), first_bad)
        seen += n
        steps += 1
        if on_step is not None:
            on_step(epoch, steps)
        if steps % log_every == 0:
            _check_finite(bad_steps, first_bad, recent, epoch, loader)
            recent.clear()
            if progress:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{loss_sum.item() / max(seen, 1):.4f}", img_s=f"{seen / max(elapsed, 1e-9):.1f}")
    _check_finite(bad_steps, first_bad, recent, epoch, loader)
    elapsed = time.perf_counter() - start
    total = float(loss_sum.item())
    return {"train_loss": total / seen if seen else math.nan, "train_images": seen, "train_steps": steps,
            "train_seconds": elapsed, "train_img_per_s": seen / elapsed if elapsed > 0 else 0.0}


def _zero_loss(model, loader, device, amp_dtype, blank):
    """A loss of exactly zero that still runs the whole network: the step of a rank with no usable image.

    Eval mode, so BatchNorm's running statistics do not see the blank image and dropout draws nothing;
    the backward pass still reaches every trainable parameter, so DDP's all-reduces fire as on the other
    ranks.
    """
    # With no batch seen yet on this rank: what the dataset reads, at the transform's output size.
    dataset = getattr(loader, "dataset", None)
    side = getattr(getattr(dataset, "transform", None), "size", None) or 64
    x = blank_inputs(blank, device, images=getattr(dataset, "read_images", True),
                     captions=getattr(dataset, "captions", None) is not None, side=side)
    was = model.training
    model.eval()
    try:
        with autocast(device, amp_dtype):
            return model(*x).float().sum() * 0.0
    finally:
        model.train(was)


def _supports_found_inf(optimizer) -> bool:
    # Fused Adam/AdamW/SGD read ``found_inf`` in step() and skip the whole update on the device.
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and any(
        g.get("fused") for g in optimizer.param_groups)


def _check_finite(bad_steps, first_bad, recent: dict, epoch: int, loader) -> None:
    if not bad_steps.item():
        return
    step = int(first_bad.item())
    names = []
    if step in recent:
        urls = getattr(getattr(loader, "dataset", None), "urls", None)
        idx = recent[step][:8].tolist()
        names = [urls[i].rsplit("/", 1)[-1] for i in idx] if urls else idx
    raise NonFiniteLossError(
        f"epoch {epoch} step {step + 1}: the loss or its gradient is not finite; that update was skipped, so the "
        "weights are still finite, and the run stops without saving. Lower --lr, keep --clip-grad on, try "
        f"--amp off, or check this batch's images: {names}")


@torch.inference_mode()
def predict_scores(model, loader, device, *, amp_dtype=None, progress: bool = True, desc: str = "score",
                   n_rows: int | None = None, pad_to: int | None = None) -> dict:
    """Sigmoid scores for every row the loader yields.

    ``pad_to``: a smaller batch (the last) is padded with blank rows to this many, whose scores are dropped:
    with cuDNN timing its algorithms per input shape, one more shape costs a round of timing every conv.

    Returns ``probs`` (n_rows, C) with NaN rows for images that could not be read, ``ok`` (bool mask of
    scored rows), ``loss`` (mean BCE over scored rows with targets) and the ``skipped`` list. Scores stay
    on the device until the pass ends: one copy back, no wait per batch.
    """
    model.eval()
    n_rows = n_rows if n_rows is not None else len(loader.dataset)
    ok = np.zeros(n_rows, dtype=bool)
    parts, where, skipped = [], [], []
    loss_sum = torch.zeros((), device=device)
    seen = 0
    start = time.perf_counter()
    bar = progress_bar(loader, desc=desc, enabled=progress)
    for batch in bar:
        inputs, y, index, lost = batch_to_device(batch, device)
        skipped.extend(batch.skipped + lost)
        if inputs is None:
            continue
        with autocast(device, amp_dtype):
            logits = model(*pad_rows(inputs, pad_to)).float()[:len(index)]
        parts.append(torch.sigmoid(logits))
        where.append(index)
        if y.numel():
            loss_sum += F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / y.shape[1]
        seen += len(index)
    num_classes = parts[0].shape[1] if parts else head(model).out_features
    probs = np.full((n_rows, num_classes), np.nan, dtype=np.float32)
    if parts:
        idx = torch.cat(where).numpy()
        probs[idx] = torch.cat(parts).cpu().numpy()
        ok[idx] = True
    elapsed = time.perf_counter() - start
    has_targets = getattr(loader.dataset, "targets", None) is not None
    return {"probs": probs, "ok": ok, "loss": float(loss_sum.item()) / seen if seen and has_targets else math.nan,
            "skipped": skipped, "seconds": elapsed, "img_per_s": seen / elapsed if elapsed > 0 else 0.0}


def pad_rows(inputs: tuple, n: int | None) -> tuple:
    """Model inputs (:func:`mlc.data.transforms.batch_to_device`) with blank rows appended up to ``n`` rows: zero
    images, empty caption bags."""
    rows = len(inputs[1]) if inputs[0].dim() == 1 else len(inputs[0])  # (ids, offsets) or (x, ...)
    if n is None or rows >= n:
        return inputs
    out = list(inputs)
    if inputs[0].dim() == 4:
        x = inputs[0]
        out[0] = torch.cat([x, x.new_zeros((n - rows, *x.shape[1:]))]).contiguous(memory_format=torch.channels_last)
    if inputs[-1].dim() == 1 and len(inputs) >= 2 and inputs[-2].dim() == 1:  # caption bags: (ids, offsets) last
        ids, offsets = inputs[-2], inputs[-1]
        out[-1] = torch.cat([offsets, offsets.new_full((n - rows,), len(ids))])
    return tuple(out)


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


def resolve_loader_workers(setting: int | None, cpus: int | None, device: torch.device) -> int:
    """DataLoader worker processes for one training process that may use ``cpus`` CPUs.

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
