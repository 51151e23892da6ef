"""Batch prediction spread over a Ray cluster's workers with Ray Data (the one module that touches Ray Data).

The driver loads the checkpoint once (label vocabulary, image size, threshold, weights) and puts the
weights in Ray's object store. The ImageIDs become a Ray Dataset with an explicit ``pos`` column (the
row's place in the input). With GPU actors, a first ``map_batches`` stage of CPU tasks reads and decodes
the images (:func:`decode_batch`, through :mod:`mlc.io.fetch`, so ``gs://`` works) into uint8 arrays and a
second runs :class:`Scorer` on a fixed pool of ``num_workers`` actors that only run the model (built once
per actor, on the GPU Ray assigned it): Ray Data streams blocks between them, so the GPUs are not idle
while images decode. With CPU actors each actor decodes its own rows (the stages would compete for the
same cores). An unreadable image keeps its row, with NaN scores and the reason. The driver puts rows back in input order by ``pos``,
whatever order blocks finish in, and writes the same files as in-process prediction.

Ray Data 2.60 notes: ``map_batches(concurrency=...)`` is deprecated (it logs a warning); a fixed actor
pool is ``compute=ray.data.ActorPoolStrategy(size=n)``. ``fn_constructor_kwargs`` are not resolved as
actor arguments (they travel in a closure and are also hashed, or repr()'d when unhashable, as the
UDF's key), so the weights go as an ``ObjectRef`` that the actor ``ray.get``s itself.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pandas as pd
import torch

from mlc.config import TrainConfig, uses_images
from mlc.data.batch import Skipped
from mlc.data.pack_source import PackedImages
from mlc.data.tokenizer import Tokenizer, encode_rows
from mlc.data.transforms import eval_transform, to_model_input, tokens_to_tensors
from mlc.distributed import cluster
from mlc.distributed.cluster import ensure_ray
from mlc.io import storage
from mlc.model.device import prepare_device
from mlc.model.fusion import build, for_scoring
from mlc.model.precision import autocast, pick_amp_dtype
from mlc.prediction.checkpoints import load_predictor, predict_from_checkpoint
from mlc.prediction.scores import row_source
from mlc.prediction.submission import write_predictions


# Ray Data 2.60 starts a usage-metrics poller thread in the driver on the first execution; it outlives
# ray.shutdown(), and its next poll then makes Ray end the process (seen killing a test session that
# went on after ray.shutdown()). Opting out of Ray Data's usage collection keeps that thread from
# starting; an explicit RAY_DATA_USAGE_DISABLED=0 still wins.
os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")


def actor_device() -> torch.device:
    """The device of a Ray task or actor: its assigned GPU, else the CPU.

    Ray narrows CUDA_VISIBLE_DEVICES to a worker's assigned GPUs, so ``cuda:0`` is the first of them. A
    worker given no GPU keeps the node's CUDA_VISIBLE_DEVICES in Ray 2.60, so ``torch.cuda.is_available()``
    is no guide there: asking it would put every CPU actor on a GPU node onto GPU 0, behind Ray's back.
    """
    import ray
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def decode_batch(batch: dict, *, images_root, image_size: int, max_pixels: int) -> dict:
    """The CPU stage: read and decode a batch of rows ``{pos, ImageID}`` into uint8 images (N, 3, S, S).

    Reads go through :meth:`mlc.data.sources.StreamTable.batch` (many requests in flight, the byte cache), the
    same path as training. An unreadable image keeps its row, with ``ok`` False and the reason in ``error``.
    """
    ids = [str(i) for i in batch["ImageID"]]
    images = images_root.take(batch["pos"]) if isinstance(images_root, PackedImages) else images_root
    b = row_source(images, ids, eval_transform(image_size), max_pixels).batch(range(len(ids)))
    image = np.zeros((len(ids), 3, image_size, image_size), dtype=np.uint8)
    ok = np.zeros(len(ids), dtype=bool)
    error = np.array([""] * len(ids), dtype=object)
    if len(b):
        image[b.index.numpy()] = b.images.numpy()
        ok[b.index.numpy()] = True
    for s in b.skipped:
        error[s.index] = f"{s.name}\t{s.reason}"
    out = {"pos": np.asarray(batch["pos"], dtype=np.int64), "ImageID": np.array(ids, dtype=object),
           "image": image, "ok": ok, "error": error}
    if "tokens" in batch:
        out["tokens"] = batch["tokens"]
    return out


def _no_images(batch: dict) -> dict:
    """A caption-only network's batch: every row is scored, no image is read."""
    n = len(batch["pos"])
    return {**batch, "ok": np.ones(n, dtype=bool), "error": np.array([""] * n, dtype=object)}


class Scorer:
    """One Ray Data actor: builds the model once, then scores batches.

    With ``decode`` False it receives decoded uint8 images from the CPU stage (:func:`decode_batch`) and
    only runs the model, so a GPU actor is never idle while images are read and decoded: Ray Data runs the
    decoding tasks on the node's CPUs, ahead of it. With ``decode`` True it reads and decodes its rows
    itself (one stage: the CPU-only layout, where a separate stage would only move bytes between processes).
    """

    def __init__(self, *, state_ref, num_classes: int, unfrozen_depth: int, dropout: float, image_size: int,
                 amp: str, max_pixels: int, images_root, decode: bool, torch_threads: int = 1,
                 inputs: str = "image", num_tokens: int = 0, model: str = "resnet50", tta: str = "none"):
        import ray
        if torch_threads >= 1:
            torch.set_num_threads(torch_threads)
        state = ray.get(state_ref)
        self.images = uses_images(inputs)
        self.device = actor_device()
        prepare_device(self.device)
        self.amp_dtype = pick_amp_dtype(amp, self.device, kind="predict", unfrozen_depth=unfrozen_depth,
                                        image_size=image_size)
        self.model = for_scoring(build(inputs, num_classes, model=model, num_tokens=num_tokens,
                                       unfrozen_depth=unfrozen_depth, dropout=dropout, weights=state,
                                       log=lambda *_: None), self.amp_dtype, tta)
        self.model.to(self.device, memory_format=torch.channels_last).eval()
        self.decode = dict(images_root=images_root, image_size=image_size, max_pixels=max_pixels) if decode else None
        self.num_classes = num_classes
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        if not self.images:
            batch = _no_images(batch)
        elif self.decode is not None:
            batch = decode_batch(batch, **self.decode)
        ok = np.asarray(batch["ok"], dtype=bool)
        probs = np.full((len(ok), self.num_classes), np.nan, dtype=np.float32)
        if ok.any():
            inputs = ()
            if self.images:
                x = torch.from_numpy(np.ascontiguousarray(batch["image"][ok]))
                if self.device.type == "cuda":
                    x = x.pin_memory()
                inputs = (to_model_input(x, self.device),)
            if "tokens" in batch:
                rows = [t for t, keep in zip(batch["tokens"], ok) if keep]
                inputs = inputs + tokens_to_tensors([[int(i) for i in t] for t in rows], self.device)
            with torch.inference_mode(), autocast(self.device, self.amp_dtype):
                logits = self.model(*inputs).float()
            probs[ok] = torch.sigmoid(logits).cpu().numpy()
        busy = (time.perf_counter() - start) / max(1, len(ok))  # this batch's time in this actor, per row
        return {"pos": batch["pos"], "ImageID": batch["ImageID"], "probs": probs, "ok": ok, "error": batch["error"],
                "worker": np.array([self.worker] * len(ok), dtype=object), "busy": np.full(len(ok), busy),
                "device": np.array([str(self.device)] * len(ok), dtype=object)}


def score_distributed(state: dict, num_classes: int, cfg: TrainConfig, ids, images_root, *,
                      num_workers: int, gpus_per_worker: float | None = None, cpus_per_worker: float | None = None,
                      batch_size: int = 64, split: bool | None = None, log=print, progress: bool = True,
                      captions=None, tokenizer: Tokenizer | None = None) -> dict:
    """Scores for every ImageID in input order, computed by ``num_workers`` Ray Data actors; with a
    ``tokenizer`` (a network that reads captions) each row's caption goes with it, tokenized here.

    ``split`` (default: when the actors have GPUs) reads and decodes the images in CPU tasks ahead of the
    model actors instead of inside them (see :class:`Scorer`).

    ``gpus_per_worker`` None means 1 when the cluster has GPUs, else 0. ``cpus_per_worker`` None is Ray Data's
    default of 1 CPU per actor (it warns that giving both CPUs and GPUs explicitly is experimental).

    Returns what :func:`mlc.prediction.scores.score_ids` returns: ``probs`` (NaN rows for unreadable images), ``ok``,
    ``skipped`` (``Skipped`` records naming each unreadable image), ``seconds`` and ``img_per_s``; plus
    ``workers`` (rows scored per actor).
    """
    import ray
    import ray.data

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1 for distributed prediction, got {num_workers}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = [str(i) for i in ids]
    n = len(ids)
    ensure_ray(log)
    resources = ray.cluster_resources()
    if gpus_per_worker is None:
        gpus_per_worker = cluster.default_gpus([resources])  # the nodes up now: prediction does not wait
    if split is None:
        split = gpus_per_worker > 0
    split = split and uses_images(cfg.inputs)
    cpus = 1 if cpus_per_worker is None else cpus_per_worker
    need_cpu, need_gpu = num_workers * cpus, num_workers * gpus_per_worker
    if need_cpu > resources.get("CPU", 0) or need_gpu > resources.get("GPU", 0):
        log(f"warning: {num_workers} workers need {need_cpu:g} CPUs and {need_gpu:g} GPUs; the cluster has "
            f"{resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs now (waiting for an "
            "autoscaler, or lower --num-workers / --gpus-per-worker)")

    probs = np.full((n, num_classes), np.nan, dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    seen = np.zeros(n, dtype=bool)
    skipped, per_worker, busy, devices = [], {}, {}, set()
    if n == 0:
        return {"probs": probs, "ok": ok, "skipped": skipped, "seconds": 0.0, "img_per_s": 0.0,
                "workers": per_worker, "devices": []}

    # One block per batch, so the actor pool shares the rows out batch by batch (one DataFrame would be one
    # block, and a block goes to one actor). The frames are split here: from_pandas(override_num_blocks=...)
    # splits with np.array_split, which hands back bare ndarrays under numpy 2.4 / pandas 3 and fails.
    rows = pd.DataFrame({"pos": np.arange(n, dtype=np.int64), "ImageID": ids})
    if tokenizer is not None:
        rows["tokens"] = pd.Series(encode_rows(tokenizer, captions, n, log), dtype=object)
    state_ref = ray.put(state)
    # A batch (a block) goes to one actor: actors beyond the number of batches would each start a process and
    # load the model (onto a GPU of their own) for nothing.
    batches = -(-n // batch_size)
    actors = min(num_workers, batches)
    fewer = f" (of {num_workers} asked: {n} rows are {batches} batch{'es' if batches > 1 else ''})" if actors < num_workers else ""
    log(f"predicting {n} images on {actors} Ray worker{'s' if actors > 1 else ''}{fewer} ({cpus:g} CPU, "
        f"{gpus_per_worker:g} GPU each, batches of {batch_size}; "
        f"{'decoding in CPU tasks ahead of them' if split else 'each decodes its rows'})")
    # A Dataset keeps a copy of the DataContext it was created under: set the progress bars before creating it.
    context = ray.data.DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, progress
    start = time.perf_counter()
    try:
        ds = ray.data.from_pandas([rows.iloc[i:i + batch_size] for i in range(0, n, batch_size)])
        model_kwargs = dict(state_ref=state_ref, num_classes=num_classes, unfrozen_depth=cfg.unfrozen_depth,
                            dropout=cfg.dropout, image_size=cfg.image_size, amp=cfg.amp,
                            max_pixels=cfg.max_image_pixels, images_root=images_root, decode=not split,
                            torch_threads=max(1, int(cpus)), inputs=cfg.inputs,
                            num_tokens=tokenizer.size if tokenizer else 0, model=cfg.model, tta=cfg.tta)
        if split:
            # Reading and decoding run as CPU tasks ahead of the model actors; Ray Data streams between them.
            ds = ds.map_batches(decode_batch, fn_kwargs=dict(images_root=images_root, image_size=cfg.image_size,
                                                              max_pixels=cfg.max_image_pixels),
                                batch_size=batch_size, batch_format="numpy", num_cpus=1,
                                udf_modifying_row_count=False)
        scored = ds.map_batches(
            Scorer, fn_constructor_kwargs=model_kwargs,
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=batch_size, batch_format="numpy",
            num_cpus=cpus_per_worker,  # None: Ray Data's default, 1
            num_gpus=gpus_per_worker if gpus_per_worker > 0 else None,
            udf_modifying_row_count=False,
        )
        # Results arrive block by block, in whatever order the actors finish them.
        for out in scored.iter_batches(batch_size=None, batch_format="numpy"):
            pos = out["pos"]
            probs[pos] = out["probs"]
            ok[pos] = out["ok"]
            seen[pos] = True
            for p, image_id, err in zip(pos, out["ImageID"], out["error"]):
                if image_id != ids[p]:
                    raise RuntimeError(f"row {p}: a worker returned {image_id}, expected {ids[p]}")
                if err:
                    name, reason = err.split("\t", 1)
                    skipped.append(Skipped(int(p), name, reason))
            for w, b, d in zip(out["worker"], out["busy"], out["device"]):
                per_worker[w] = per_worker.get(w, 0) + 1
                busy[w] = busy.get(w, 0.0) + float(b)
                devices.add(str(d))
    finally:
        context.enable_progress_bars = bars
        del state_ref
    elapsed = time.perf_counter() - start
    if not seen.all():
        missing = [ids[i] for i in np.flatnonzero(~seen)[:10]]
        raise RuntimeError(f"{int((~seen).sum())} of {n} rows came back from no worker (first: {missing})")
    skipped.sort(key=lambda s: s.index)
    for s in skipped:
        log(f"warning: cannot read {s.name} ({s.reason}); its row is written with no labels")
    log(f"scored {n} images on {len(per_worker)} of {actors} Ray worker{'s' if actors > 1 else ''} in {elapsed:.1f}s "
        f"({n / elapsed:.1f} img/s, actor start-up included); per worker: "
        + ", ".join(f"{per_worker[w]} rows at {per_worker[w] / max(busy[w], 1e-9):.1f} img/s" for w in per_worker))
    return {"probs": probs, "ok": ok, "skipped": skipped, "seconds": elapsed,
            "img_per_s": n / elapsed if elapsed > 0 else 0.0, "workers": per_worker, "devices": sorted(devices)}


def predict(checkpoint: str, data: str | None = None, output: str | None = None, *, num_workers: int = 0,
            **kwargs) -> dict:
    """``mlc.predict``: :func:`mlc.prediction.checkpoints.predict_from_checkpoint`, on ``num_workers`` Ray Data
    actors when it is >= 1 (:func:`score_distributed`), else in this process, then report.html beside the
    predictions (:mod:`mlc.report`; a report that fails is a warning). Ray is imported only for the actors."""
    from mlc.report.build import try_write_report
    return predict_from_checkpoint(checkpoint, data, output, num_workers=num_workers,
                                   scorer=score_distributed if num_workers >= 1 else None, report=try_write_report,
                                   **kwargs)


def predict_distributed(checkpoint_url: str, ids, images_root: str, output: str, *, num_workers: int,
                        gpus_per_worker: float | None = None, cpus_per_worker: float | None = None,
                        batch_size: int = 64,
                        split: bool | None = None, log=print, progress: bool = True) -> dict:
    """Write ``predictions.csv`` and ``probabilities.csv`` under ``output`` for ``ids`` (in their order),
    scored by ``num_workers`` Ray actors; vocabulary, image size and threshold come from the checkpoint."""
    state, vocab, cfg, choice, tokenizer = load_predictor(checkpoint_url)
    storage.check_writable(output)
    if tokenizer is not None:
        raise ValueError(f"{checkpoint_url} reads captions ({cfg.inputs}); predict with mlc.predict or "
                         "jobs/predict.py, which read them from the table")
    out = score_distributed(state, len(vocab), cfg, ids, images_root, num_workers=num_workers,
                            gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, batch_size=batch_size,
                            split=split, log=log, progress=progress)
    summary = write_predictions(output, ids, out["probs"], out["ok"], vocab, choice)
    summary.update(seconds=out["seconds"], img_per_s=out["img_per_s"], workers=out["workers"], devices=out["devices"])
    return summary
