"""The prepared GPU check (``jobs/bench.py --gpu``): one script, under 5 minutes on one GPU.

It measures, on the first CUDA device, in one process:

1. model-only training img/s at depth 4 (full fine-tune) and depth 1, bf16 (fp16 below sm80),
   channels_last, eager and ``torch.compile``d;
2. model-only prediction img/s, eager and compiled;
3. end to end with real JPEGs at depth 4: mlc's loader decoding on the CPU (its default loader workers
   for this machine) against ``--gpu-decode`` (nvJPEG), each beside the model-only figure.

Every item has a time budget and is skipped, saying so, when the run would pass ``budget_s``: a
compile that takes minutes on a slow node must not cost the other figures. The table it prints is
what goes into the README's measurements. The same code runs on a CPU with tiny settings (the tests
do that) so that it cannot rot while no GPU is at hand.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from mlc.bench.e2e import TimedAfterFirst
from mlc.train.engine import make_optimizer, resolve_loader_workers
from mlc.model.resnet import build_model, trainable_parameter_groups
from mlc.model.precision import NAMES, model_step, pick_amp_dtype


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(depth, device, compiled):
    torch.manual_seed(0)
    m = build_model(18, depth, dropout=0.0, weights="none").to(device, memory_format=torch.channels_last)
    opt = make_optimizer(trainable_parameter_groups(m, 0.01), "adamw", 1e-4, device=device)
    return (torch.compile(m) if compiled else m), m, opt


def model_only(device, *, depth: int, kind: str, compiled: bool, batch: int, size: int, steps: int, amp) -> dict:
    model, bare, opt = _model(depth, device, compiled)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 18, device=device) < 0.15).float()

    def step():
        model_step(model, opt, x, y, device, amp, train=kind == "train")

    t = time.perf_counter()
    for _ in range(2):  # warm-up: cuDNN autotuning, and the compile itself
        step()
    _sync(device)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - t
    return {"img_s": steps * batch / seconds, "warmup_s": warm}


def end_to_end(device, paths, *, depth: int, gpu_decode: bool, batch: int, size: int, amp, workers: int) -> dict:
    """Training steps fed by mlc's own loader over ``paths`` (one pass, the first batch untimed)."""
    from mlc.data.datasets import ImageTable
    from mlc.data.loader import make_loader
    from mlc.train.engine import train_one_epoch
    from mlc.data.transforms import train_transform
    _, bare, opt = _model(depth, device, False)
    y = (np.random.default_rng(0).random((len(paths), 18)) < 0.15).astype(np.float32)
    ds = ImageTable(paths, y, train_transform(size), 50_000_000, gpu_decode=gpu_decode)
    loader = make_loader(ds, batch, shuffle=True, seed=0, epoch=1, num_workers=workers,
                         pin_memory=device.type == "cuda", drop_last=True)
    timed = TimedAfterFirst(loader, sync=lambda: _sync(device))
    train_one_epoch(bare, timed, opt, None, device, epoch=1, amp_dtype=amp, clip_grad=1.0, progress=False)
    _sync(device)
    return {"img_s": timed.n / (time.perf_counter() - timed.t0)}


def run(device, paths, *, batch: int = 256, size: int = 224, steps: int = 20, budget_s: float = 270.0,
        workers: int | None = None, amp_setting: str = "auto", log=print) -> list:
    start = time.perf_counter()
    amp = pick_amp_dtype(amp_setting, device, kind="train", unfrozen_depth=4, image_size=size)
    workers = resolve_loader_workers(workers, len(os.sched_getaffinity(0)), device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    cc = ".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else "-"
    log(f"{name} (sm {cc}), torch {torch.__version__}, {NAMES[amp]}, batch {batch}, {size} px, "
        f"{os.cpu_count()} CPUs, {workers} loader workers")
    plan = [("train depth 4", "model", dict(depth=4, kind="train", compiled=False)),
            ("train depth 1", "model", dict(depth=1, kind="train", compiled=False)),
            ("predict", "model", dict(depth=1, kind="predict", compiled=False)),
            ("end to end, depth 4, CPU decode", "e2e", dict(depth=4, gpu_decode=False)),
            ("end to end, depth 4, GPU decode", "e2e", dict(depth=4, gpu_decode=True)),
            ("train depth 4, compiled", "model", dict(depth=4, kind="train", compiled=True)),
            ("train depth 1, compiled", "model", dict(depth=1, kind="train", compiled=True)),
            ("predict, compiled", "model", dict(depth=1, kind="predict", compiled=True))]
    rows = []
    for label, what, kw in plan:
        left = budget_s - (time.perf_counter() - start)
        # A compile takes about a minute; an end-to-end pass is bounded by its images.
        need = 90 if kw.get("compiled") else 20
        if left < need:
            rows.append({"item": label, "skipped": f"time budget ({left:.0f} s left)"})
            log(f"  {label:<36} skipped: time budget")
            continue
        try:
            if what == "model":
                r = model_only(device, batch=batch if kw["kind"] == "train" else 2 * batch, size=size,
                               steps=steps, amp=amp, **kw)
            else:
                r = end_to_end(device, paths, batch=batch, size=size, amp=amp, workers=workers, **kw)
        except Exception as e:  # noqa: BLE001 - report and go on: one failing item must not hide the rest
            rows.append({"item": label, "error": f"{type(e).__name__}: {e}"})
            log(f"  {label:<36} error: {type(e).__name__}: {e}")
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append({"item": label, **r, "peak_gpu_gb": mem})
        log(f"  {label:<36} {r['img_s']:9.1f} img/s" + (f"  (warm-up/compile {r['warmup_s']:.0f} s)"
                                                       if "warmup_s" in r else ""))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    log("\n| item | img/s | note |\n|---|---|---|")
    for r in rows:
        note = r.get("skipped") or r.get("error") or (f"warm-up {r['warmup_s']:.0f} s" if "warmup_s" in r else "")
        log(f"| {r['item']} | {r['img_s']:.0f} | {note} |" if "img_s" in r else f"| {r['item']} | - | {note} |")
    log(json.dumps(rows))
    return rows


def main(args, folder) -> list:
    if not torch.cuda.is_available():
        raise SystemExit("error: --gpu needs a CUDA device; this machine has none (try --e2e for the CPU)")
    paths = sorted(str(p) for p in folder.iterdir() if p.is_file())[:2048]
    return run(torch.device("cuda", 0), paths)
