"""Throughput of the training step and of prediction, measured side by side in one process.

Model compute only (random input tensors, no image decoding), so the numbers
show what the model costs on this device; loader speed is a separate question.
"""

from __future__ import annotations

import time

import torch

from mlc.train.engine import make_optimizer
from mlc.model.resnet import build_model, trainable_parameter_groups
from mlc.model.precision import model_step, pick_amp_dtype


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
        model_step(model, opt, x, y, device, amp_dtype, train=True)

    def predict_step():
        model_step(model, opt, x, y, device, amp_dtype, train=False)

    t_train = _time(train_step, steps, warmup, sync)
    t_pred = _time(predict_step, steps, warmup, sync)
    return {"depth": depth, "image_size": image_size, "batch_size": batch_size, "amp": str(amp_dtype),
            "train_img_s": steps * batch_size / t_train, "predict_img_s": steps * batch_size / t_pred}


# ---------------------------------------------------------------------------------------------------------
# Loader throughput: the same images from local disk and from a GCS API server with added latency.


def _loader_pass(urls: list, *, image_size: int, batch_size: int, workers: int, epoch: int,
                 read_ahead: bool = True) -> dict:
    """One epoch of the training loader over ``urls`` (decode + augment, no model): images and seconds."""
    import numpy as np

    from mlc.data.loader import make_loader
    from mlc.data.sources import StreamTable
    from mlc.data.transforms import train_transform
    source = StreamTable(urls, np.zeros((len(urls), 1), dtype=np.float32), train_transform(image_size), 50_000_000)
    t = time.perf_counter()
    n = skipped = 0
    loader = make_loader(source, batch_size, shuffle=True, seed=0, epoch=epoch, num_workers=workers)
    if not read_ahead:
        source.set_plan([], workers)  # the loader planned its batches: forget them, so nothing is read ahead
    for batch in loader:
        n += len(batch)
        skipped += len(batch.skipped)
    seconds = time.perf_counter() - t
    return {"images": n, "skipped": skipped, "seconds": seconds, "img_s": n / seconds}


def _cpu_seconds(pids) -> float | None:
    """CPU time (user + system) used so far by these processes (Linux /proc), None where unknown."""
    import os
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None
    return total


def _own_cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the loader workers of past epochs)."""
    import resource
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def measure_io(local_urls: list, remote_urls: list, *, endpoints: dict, cache_root: str, image_size: int,
               batch_size: int, workers: int, sequential_images: int, repeats: int = 2, server_pids=(),
               log=print) -> list:
    """Loader img/s over the same images read from local disk and through the remote endpoints.

    ``endpoints``: ``{"direct": URL of the emulator, "proxy": URL of a 0 ms proxy, "latency": URL of the
    proxy adding ``latency_ms``}``; each row points ``STORAGE_EMULATOR_HOST`` at one of them (DataLoader
    workers are forked per epoch and inherit it). ``cache_root``: a folder for byte caches, one fresh
    cache per cold pass. Each row is the best of ``repeats`` passes (the machine is shared and noisy),
    and the repeats of all rows are interleaved so that a slow spell hits every row alike.
    """
    import os

    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "MLC_BYTE_CACHE", "MLC_FETCH_CONCURRENCY")}
    latency = endpoints.get("latency_ms", 50)
    n_seq = sequential_images
    plan = [  # name, urls, endpoint, concurrency, cache ("cold", "warm" = the previous cold one's, None = off)
        ("local disk", local_urls, None, None, None),
        ("emulator direct (no proxy), 4 requests in flight per worker, no cache", remote_urls, "direct", 4, None),
        ("emulator via proxy (+0 ms), cold cache", remote_urls, "proxy", None, "cold"),
        (f"+{latency:g} ms per request, one GET at a time per worker (no batching, read-ahead or cache; {n_seq} images)",
         remote_urls[:n_seq], "latency", 1, None),
        (f"+{latency:g} ms per request, cold cache (epoch 1)", remote_urls, "latency", None, "cold"),
        (f"+{latency:g} ms per request, warm cache (epoch 2)", remote_urls, "latency", None, "warm"),
    ]
    best: dict = {}
    counter = [0]
    try:
        _loader_pass(local_urls[: batch_size * workers], image_size=image_size, batch_size=batch_size,
                     workers=workers, epoch=0)  # warm-up: imports, page cache of the first files
        for rep in range(repeats):
            cold_dir = None
            for name, urls, endpoint, concurrency, cache in plan:
                if endpoint:
                    os.environ["STORAGE_EMULATOR_HOST"] = endpoints[endpoint]
                if cache == "cold":
                    counter[0] += 1
                    cold_dir = os.path.join(cache_root, f"c{counter[0]}")
                os.environ["MLC_BYTE_CACHE"] = cold_dir if cache else "off"
                if concurrency:
                    os.environ["MLC_FETCH_CONCURRENCY"] = str(concurrency)
                else:
                    os.environ.pop("MLC_FETCH_CONCURRENCY", None)
                server0, own0 = _cpu_seconds(server_pids), _own_cpu_seconds()
                r = _loader_pass(urls, image_size=image_size, batch_size=batch_size, workers=workers,
                                 epoch=2 if cache == "warm" else 1, read_ahead=concurrency != 1)
                server1 = _cpu_seconds(server_pids)
                r["loader_cpu_s"] = _own_cpu_seconds() - own0
                r["server_cpu_s"] = server1 - server0 if server0 is not None and server1 is not None else None
                r["name"] = name
                log(f"  [{rep + 1}/{repeats}] {name:<86} {r['img_s']:8.1f} img/s  ({r['images']} images in "
                    f"{r['seconds']:.1f} s{', %d skipped' % r['skipped'] if r['skipped'] else ''}; CPU s: loader "
                    f"{r['loader_cpu_s']:.1f}, server {r['server_cpu_s'] or 0:.1f})")
                if name not in best or r["img_s"] > best[name]["img_s"]:
                    best[name] = r
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [best[name] for name, *_ in plan]
