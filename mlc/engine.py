"""One epoch of training and one pass of scoring, with explicit arguments and no Ray imports.

Local mode and Ray Train call the same two functions.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class NonFiniteLossError(FloatingPointError):
    pass


def autocast(device: torch.device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _to_device(batch, device, channels_last: bool = True):
    non_blocking = device.type == "cuda"
    x = batch.x.to(device, non_blocking=non_blocking)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, batch.y.to(device, non_blocking=non_blocking)


def train_one_epoch(model, loader, optimizer, scheduler, device, *, epoch: int, amp_dtype=None,
                    clip_grad: float = 0.0, bad_images=None, progress: bool = True, desc: str = "",
                    on_step=None) -> dict:
    """Train for one pass over ``loader``; returns mean loss, image count and throughput.

    ``on_step(epoch, step)``, when given, is called after each optimizer step (progress hooks, fault drills).

    A non-finite loss raises NonFiniteLossError before the optimizer step, so no
    non-finite weights are ever produced (and hence never checkpointed).
    """
    model.train()
    total_loss, seen, steps = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc or f"train {epoch}", disable=not progress, unit="batch", leave=False)
    for batch in bar:
        if bad_images is not None and batch.skipped:
            bad_images.add(batch.skipped)
        if len(batch) == 0:
            continue
        x, y = _to_device(batch, device)
        with autocast(device, amp_dtype):
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"epoch {epoch} step {steps}: loss is {loss.item()}; stopping without saving. "
                "Lower --lr, keep --clip-grad on, or check the images of this batch: "
                f"{batch.index[:8].tolist()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_grad)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = x.shape[0]
        total_loss += loss.item() * n
        seen += n
        steps += 1
        if on_step is not None:
            on_step(epoch, steps)
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", img_s=f"{seen / max(elapsed, 1e-9):.1f}")
    elapsed = time.perf_counter() - start
    return {"train_loss": total_loss / seen if seen else math.nan, "train_images": seen, "train_steps": steps,
            "train_seconds": elapsed, "train_img_per_s": seen / elapsed if elapsed > 0 else 0.0}


@torch.no_grad()
def predict_scores(model, loader, device, *, amp_dtype=None, progress: bool = True, desc: str = "score",
                   n_rows: int | None = None) -> dict:
    """Sigmoid scores for every row the loader yields.

    Returns ``probs`` (n_rows, C) with NaN rows for images that could not be
    read, ``ok`` (bool mask of scored rows), ``loss`` (mean BCE over scored rows
    with targets) and the ``skipped`` list.
    """
    model.eval()
    n_rows = n_rows if n_rows is not None else len(loader.dataset)
    probs = None
    ok = np.zeros(n_rows, dtype=bool)
    total_loss, seen, skipped = 0.0, 0, []
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not progress, unit="batch", leave=False)
    for batch in bar:
        skipped.extend(batch.skipped)
        if len(batch) == 0:
            continue
        x, y = _to_device(batch, device)
        with autocast(device, amp_dtype):
            logits = model(x).float()
        if probs is None:
            probs = np.full((n_rows, logits.shape[1]), np.nan, dtype=np.float32)
        idx = batch.index.numpy()
        probs[idx] = torch.sigmoid(logits).cpu().numpy()
        ok[idx] = True
        if y.numel():
            total_loss += F.binary_cross_entropy_with_logits(logits, y, reduction="sum").item() / y.shape[1]
        seen += x.shape[0]
        bar.set_postfix(img_s=f"{seen / max(time.perf_counter() - start, 1e-9):.1f}")
    if probs is None:
        probs = np.full((n_rows, getattr(model, "module", model).fc.out_features), np.nan, dtype=np.float32)
    elapsed = time.perf_counter() - start
    return {"probs": probs, "ok": ok, "loss": total_loss / seen if seen else math.nan, "skipped": skipped,
            "seconds": elapsed, "img_per_s": seen / elapsed if elapsed > 0 else 0.0}


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to 0 at ``total_steps``."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return f


def make_optimizer(params, name: str, lr: float, momentum: float = 0.9):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}; use adamw or sgd")


def pick_amp_dtype(setting: str, device: torch.device):
    """bf16 autocast where bf16 is faster than fp32: GPUs with bf16, and CPUs with AMX tiles.

    On a CPU with AVX512-BF16 but no AMX, jobs/bench.py measured bf16 at 0.74x the fp32 training
    throughput (2-core dev machine), so ``auto`` stays in fp32 there; ``--amp bf16`` forces it.
    """
    if setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return None


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags
