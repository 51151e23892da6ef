"""The prepared GPU check (``jobs/bench.py --gpu``): one script, under 5 minutes on one GPU.

It measures, on the first CUDA device, in one process:

1. model-only training img/s at depth 4 (full fine-tune) and depth 1, bf16 (fp16 below sm80),
   channels_last, eager and ``torch.compile``d;
2. model-only prediction img/s, eager and compiled;
3. end to end with real JPEGs at depths 1 and 4: mlc's loader decoding on the CPU every epoch (its default
   loader workers for this machine), reading the decode-once store (a warm epoch; and the first epoch, which
   fills it, as a multiple of a warm one), and reading the compact store (JPEG slots decoded per batch) filled
   from a pack of the images before the first step; prediction end to end; each as a share of the model alone
   at the same depth.

A failed row (a non-finite loss above all) is reported in the table, and then the check fails.

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
from mlc.data.loader import resolve_loader_workers
from mlc.train.engine import StepContext, make_optimizer
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


def _source(paths, size, kind, store):
    from mlc.data.sources import StoredTable, StreamTable
    from mlc.data.transforms import eval_transform, train_transform
    y = (np.random.default_rng(0).random((len(paths), 18)) < 0.15).astype(np.float32)
    tf = train_transform(size) if kind == "train" else eval_transform(size)
    if store is None:
        return StreamTable(paths, y, tf, 50_000_000)
    return StoredTable(paths, y, tf, 50_000_000, store, np.arange(len(paths)))


def _pack_of(paths: list, size: int, folder: str):
    """A JPEG pack (under ``folder``) of the distinct files of ``paths``, which share one folder, and where each
    row of ``paths`` is in it: made once before any run, as ``jobs/pack.py`` does."""
    import pandas as pd

    from mlc.data.pack import open_pack
    from mlc.data.pack_source import locate_ids
    from mlc.data.pack_write import PackConfig, pack_in_process
    names = [os.path.basename(p) for p in paths]
    distinct = sorted(set(names))
    tables = os.path.join(folder, "tables")
    os.makedirs(tables)
    pd.DataFrame({"ImageID": distinct, "Labels": "1"}).to_csv(os.path.join(tables, "train.csv"), index=False)
    pd.DataFrame({"ImageID": distinct[:1]}).to_csv(os.path.join(tables, "test.csv"), index=False)
    out = os.path.join(folder, "pack")
    pack_in_process(PackConfig(data=tables, images=os.path.dirname(paths[0]), output=out, image_size=size),
                    log=lambda *_: None)
    pack = open_pack(out)
    return pack, locate_ids(pack, names, "images of the check")


def _store_for(source: str, paths: list, size: int, scratch: str):
    """(the store that ``source`` reads, seconds spent filling it before the first step): none (stream); the
    decode-once store, which the first epoch fills; or the compact store filled from a pack of the images before
    the first step, as a run from a packed ``--data`` fills it when raw pixels do not fit memory."""
    from mlc.bench.pack import compact_budget
    from mlc.data.pack_source import fill_store
    from mlc.data.store_choice import open_for_run
    if source == "stream":
        return None, 0.0
    if source == "store":
        store = open_for_run(paths, size, "auto", None, log=lambda *_: None)
        if store is None:
            raise RuntimeError("no room for the image store on this node")
        return store, 0.0
    pack, rows = _pack_of(paths, size, scratch)
    start = time.perf_counter()
    store = open_for_run(pack.names("train", rows.ids), size, "memory", compact_budget(len(paths), size),
                         log=lambda *_: None, key=pack.manifest["source"]["key"])
    if store is None or store.compact is None:
        raise RuntimeError("no room for the compact image store in this node's memory")
    fill_store(store, rows, log=lambda *_: None)
    return store, time.perf_counter() - start


def end_to_end(device, paths, *, depth: int, source: str, batch: int, size: int, amp, workers: int,
               kind: str = "train") -> dict:
    """Steps fed by mlc's own loader over ``paths`` from ``source`` (:func:`_store_for`): stream (decoded on the
    CPU every epoch), store or packed. From a store, a first epoch (with the filling before it) is timed whole, then
    a warm epoch. img/s leaves the first batch of the measured pass out. A non-finite loss raises."""
    import tempfile

    from mlc.data.loader import make_loader
    from mlc.model.resnet import fold_batchnorm
    from mlc.prediction.scores import predict_scores
    from mlc.train.engine import train_one_epoch
    _, bare, opt = _model(depth, device, False)
    pin = device.type == "cuda"
    steps = StepContext(opt, None, device, amp, clip_grad=1.0)

    def one_pass(rows, epoch, timed: bool):
        loader = make_loader(rows, batch, shuffle=kind == "train", seed=0, epoch=epoch, num_workers=workers,
                             pin_memory=pin, drop_last=kind == "train")
        loader = TimedAfterFirst(loader, sync=lambda: _sync(device)) if timed else loader
        t = time.perf_counter()
        if kind == "train":
            train_one_epoch(bare, loader, steps, epoch=epoch, progress=False)
        else:
            predict_scores(fold_batchnorm(bare, amp), loader, device, n_rows=len(paths), amp_dtype=amp,
                           progress=False)
        _sync(device)
        return loader, time.perf_counter() - t

    with tempfile.TemporaryDirectory(prefix="mlc-gpu-check-") as scratch:
        store, filling = _store_for(source, paths, size, scratch)
        try:
            rows, out = _source(paths, size, kind, store), {}
            if store is not None:
                out["first_epoch_s"] = filling + one_pass(rows, 1, False)[1]
            timed, seconds = one_pass(rows, 2, True)
            out["img_s"] = timed.n / (time.perf_counter() - timed.t0)
            if store is not None:
                out["warm_epoch_s"] = seconds
            return out
        finally:
            if store is not None:
                store.close()


def _plan(depths) -> list:
    """(label, what, settings) in the order they run: everything eager first, then the compiles, so that a
    slow compile can only cost compiled rows."""
    plan = []
    for d in depths:
        plan += [(f"depth {d}: model alone", "model", dict(depth=d, kind="train", compiled=False)),
                 (f"depth {d}: end to end, CPU decode", "e2e", dict(depth=d, source="stream")),
                 (f"depth {d}: end to end, store", "e2e", dict(depth=d, source="store")),
                 (f"depth {d}: end to end, compact from pack", "e2e", dict(depth=d, source="packed"))]
    plan += [("predict: model alone", "model", dict(depth=1, kind="predict", compiled=False)),
             ("predict: end to end, CPU decode", "e2e", dict(depth=1, source="stream", kind="predict"))]
    plan += [(f"depth {d}: model alone, compiled", "model", dict(depth=d, kind="train", compiled=True))
             for d in depths]
    return plan + [("predict: model alone, compiled", "model", dict(depth=1, kind="predict", compiled=True))]


def _ratio_to(rows: list, label: str) -> str:
    """This row's img/s over its model-alone row's (same depth or prediction, eager), as text."""
    base = label.split(":")[0] + ": model alone"
    r = next((x for x in rows if x["item"] == label), None)
    m = next((x for x in rows if x["item"] == base and "img_s" in x), None)
    if r is None or m is None or "img_s" not in r or label == base:
        return ""
    return f"{r['img_s'] / m['img_s']:.0%} of the model alone"


def run(device, paths, *, batch: int = 256, size: int = 224, steps: int = 20, budget_s: float = 280.0,
        workers: int | None = None, amp_setting: str = "auto", depths=(1, 4), log=print) -> list:
    """Every row of :func:`_plan` within ``budget_s``; prints a table and raises after it when any row failed
    (a non-finite loss among them): a check that hides a failure would be worse than none."""
    start = time.perf_counter()
    amp = pick_amp_dtype(amp_setting, device, kind="train", unfrozen_depth=4, image_size=size)
    workers = resolve_loader_workers(workers, len(os.sched_getaffinity(0)), device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    cc = ".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else "-"
    log(f"{name} (sm {cc}), torch {torch.__version__}, {NAMES[amp]}, batch {batch}, {size} px, "
        f"{os.cpu_count()} CPUs, {workers} loader workers, {len(paths)} images per epoch")
    rows = []
    for label, what, kw in _plan(depths):
        left = budget_s - (time.perf_counter() - start)
        # A compile takes about a minute; an end-to-end pass is bounded by its images.
        need = 90 if kw.get("compiled") else 15
        if left < need:
            rows.append({"item": label, "skipped": f"time budget ({left:.0f} s left)"})
            log(f"  {label:<40} skipped: time budget")
            continue
        try:
            if what == "model":
                r = model_only(device, batch=batch if kw["kind"] == "train" else 2 * batch, size=size,
                               steps=steps, amp=amp, **kw)
            else:
                r = end_to_end(device, paths, batch=batch if kw.get("kind", "train") == "train" else 2 * batch,
                               size=size, amp=amp, workers=workers, **kw)
        except Exception as e:  # noqa: BLE001 - report and go on: one failing item must not hide the rest
            rows.append({"item": label, "error": f"{type(e).__name__}: {e}"})
            log(f"  {label:<40} error: {type(e).__name__}: {e}")
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append({"item": label, **r, "peak_gpu_gb": mem})
        extra = (f"  (warm-up/compile {r['warmup_s']:.0f} s)" if "warmup_s" in r else "") + \
            (f"  (first epoch {r['first_epoch_s']:.1f} s = {r['first_epoch_s'] / r['warm_epoch_s']:.2f}x a warm one)"
             if "first_epoch_s" in r else "")
        log(f"  {label:<40} {r['img_s']:9.1f} img/s {_ratio_to(rows, label)}{extra}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    log("\n| item | img/s | vs model alone | note |\n|---|---|---|---|")
    for r in rows:
        note = r.get("skipped") or r.get("error") or (f"warm-up {r['warmup_s']:.0f} s" if "warmup_s" in r else "")
        if "first_epoch_s" in r:
            note = f"first epoch {r['first_epoch_s'] / r['warm_epoch_s']:.2f}x a warm one"
        log(f"| {r['item']} | {r['img_s']:.0f} | {_ratio_to(rows, r['item'])} | {note} |" if "img_s" in r
            else f"| {r['item']} | - | | {note} |")
    log(json.dumps(rows))
    failed = [r for r in rows if "error" in r]
    if failed:
        raise RuntimeError(f"{len(failed)} item(s) failed: " + "; ".join(f"{r['item']}: {r['error']}" for r in failed))
    return rows


def main(args, folder) -> list:
    if not torch.cuda.is_available():
        raise SystemExit("error: --gpu needs a CUDA device; this machine has none (try --e2e for the CPU)")
    paths = sorted(str(p) for p in folder.iterdir() if p.is_file())
    # Repeated to 16,384 rows, so that an epoch lasts seconds on a fast GPU (each row is its own store slot).
    paths = (paths * (16_384 // max(1, len(paths)) + 1))[:16_384]
    return run(torch.device("cuda", 0), paths)
