"""Throughput of the training step and of prediction, measured side by side in one process.

Model compute only (random input tensors, no image decoding), so the numbers
show what the model costs on this device; loader speed is a separate question.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .engine import autocast, make_optimizer, pick_amp_dtype
from .model import build_model, trainable_parameter_groups


def _time(fn, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return time.perf_counter() - t


def measure(depth: int, image_size: int, batch_size: int, amp: str, device: torch.device, steps: int = 5,
            warmup: int = 2, num_classes: int = 18) -> dict:
    torch.manual_seed(0)
    model = build_model(num_classes, unfrozen_depth=depth, dropout=0.0).to(device, memory_format=torch.channels_last)
    opt = make_optimizer(trainable_parameter_groups(model, 0.01), "adamw", 1e-4)
    amp_dtype = pick_amp_dtype(amp, device)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch_size, num_classes, device=device) < 0.15).float()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def train_step():
        model.train()
        with autocast(device, amp_dtype):
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def predict_step():
        model.eval()
        with autocast(device, amp_dtype):
            model(x)

    t_train = _time(train_step, steps, warmup, sync)
    t_pred = _time(predict_step, steps, warmup, sync)
    return {"depth": depth, "image_size": image_size, "batch_size": batch_size, "amp": str(amp_dtype),
            "train_img_s": steps * batch_size / t_train, "predict_img_s": steps * batch_size / t_pred}
