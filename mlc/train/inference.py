"""Inference: scores for a list of ImageIDs in this process, and predictions from a checkpoint alone (in this
process, or on Ray Data actors through :mod:`mlc.distributed.predict`); ``mlc.predict`` and jobs/predict.py call it."""

from __future__ import annotations

import torch

from mlc.io import storage
from mlc.io.lock import hold
from mlc.train.checkpoint import load_model_checkpoint, load_predictor, model_folder, tokenizer_of
from mlc.config import TrainConfig
from mlc.data.datasets import DataPaths, ImageTable, check_images_found, image_urls
from mlc.data.loader import make_loader
from mlc.model.device import available_cpus, pick_device, prepare_device
from mlc.train.engine import predict_scores, resolve_loader_workers
from mlc.errors import UsageError
from mlc.model.fusion import build, for_scoring, uses_images
from mlc.model.precision import NAMES, pick_amp_dtype
from mlc.train.submission import write_predictions
from mlc.data.table import read_ids_captions
from mlc.data.tokenizer import Tokenizer, encode_rows
from mlc.data.transforms import eval_transform


def score_ids(model, ids, images_root: str, *, image_size: int, device, amp_dtype, batch_size: int,
              num_workers: int, max_pixels: int, log=print, progress: bool = True, captions=None,
              tokenizer: Tokenizer | None = None, read_images: bool = True) -> dict:
    """Scores for every ImageID in order; an unreadable image keeps its row (NaN scores) and is warned about.
    With a ``tokenizer`` each row's caption (``captions``, None for a row without one) goes in too."""
    tokens = encode_rows(tokenizer, captions, len(ids), log) if tokenizer is not None else None
    ds = ImageTable(image_urls(images_root, ids), None, eval_transform(image_size), max_pixels, captions=tokens,
                    read_images=read_images)
    loader = make_loader(ds, batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    out = predict_scores(model, loader, device, amp_dtype=amp_dtype, progress=progress, desc="predict")
    for s in out["skipped"]:
        log(f"warning: cannot read {s.name} ({s.reason}); its row is written with no labels")
    return out


def score_here(state: dict, num_classes: int, cfg, ids, images_root: str, *, batch_size: int,
               loader_workers: int | None, device=None, log=print, progress: bool = True, captions=None,
               tokenizer: Tokenizer | None = None) -> dict:
    """:func:`score_ids` with the model ``cfg`` describes, built from ``state`` on ``device`` (default: this
    process's, :func:`mlc.model.device.pick_device`), BatchNorm folded, precision and loader workers decided here.
    Adds ``device`` and ``precision`` (its name) to what :func:`score_ids` returns."""
    device = device or pick_device()
    prepare_device(device)
    amp_dtype = pick_amp_dtype(cfg.amp, device, kind="predict", unfrozen_depth=cfg.unfrozen_depth,
                               image_size=cfg.image_size, log=log)
    model = for_scoring(build(cfg.inputs, num_classes, num_tokens=tokenizer.size if tokenizer else 0,
                              unfrozen_depth=cfg.unfrozen_depth, dropout=cfg.dropout, weights=state,
                              freeze_bn=cfg.freeze_bn), amp_dtype)
    model.to(device, memory_format=torch.channels_last)  # as its inputs are: no layout change per call
    cpus = available_cpus()
    workers = resolve_loader_workers(loader_workers, cpus, device)
    # Decided here, where the images are scored, and said here (the machine that parsed the flags may differ).
    log(f"scoring on {device}, precision {NAMES[amp_dtype]}, {workers} loader workers ({cpus} CPUs), "
        f"batches of {batch_size}")
    out = score_ids(model, ids, images_root, image_size=cfg.image_size, device=device, amp_dtype=amp_dtype,
                    batch_size=batch_size, num_workers=workers, max_pixels=cfg.max_image_pixels, log=log,
                    progress=progress, captions=captions, tokenizer=tokenizer, read_images=uses_images(cfg.inputs))
    return {**out, "device": device, "precision": NAMES[amp_dtype]}


def predict_from_checkpoint(checkpoint: str, data: str | None = None, output: str | None = None, *,
                            ids_csv: str | None = None,
                            images: str | None = None, batch_size: int = 64, num_workers: int = 0,
                            loader_workers: int | None = None, gpus_per_worker: float | None = None,
                            cpus_per_worker: float | None = None, log=print, progress: bool = True,
                            scorer=None) -> dict:
    """Predict test.csv (or any table with an ImageID column) with label vocabulary, image size and
    threshold taken from the checkpoint alone.

    ``num_workers`` 0 scores in this process (``loader_workers`` DataLoader processes read the images);
    ``num_workers`` N >= 1 hands them to ``scorer`` (called as :func:`mlc.distributed.predict.score_distributed`
    is: N Ray Data actors on the cluster in RAY_ADDRESS, or a local Ray, each with ``gpus_per_worker`` GPUs,
    default 1 when the cluster has GPUs, else 0); :func:`mlc.distributed.predict.predict` passes that one.
    Without ``images`` the image folder is the one the checkpoint was trained with, resolved against
    ``data`` (default: the checkpoint's dataset root). Returns the summary: rows, unreadable ImageIDs, rows
    with no label, seconds, images per second.
    """
    if output is None:
        raise TypeError("predict needs output=: the folder for predictions.csv and probabilities.csv")
    if num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {num_workers}")
    if num_workers >= 1 and scorer is None:
        raise TypeError("num_workers >= 1 scores on Ray: call mlc.predict (mlc.distributed.predict.predict), "
                        "which passes the Ray Data scorer")
    state, vocab, cfg, choice, tokenizer = load_predictor(checkpoint)
    data = data or cfg.data
    if data is None:
        raise UsageError(f"{checkpoint}: its config names no dataset root; pass --data")
    paths = DataPaths.resolve(data, images=images if images is not None else cfg.images, test_csv=ids_csv)
    ids, captions = read_ids_captions(paths.test_csv)
    if tokenizer is not None and captions is None:
        log(f"warning: {paths.test_csv} has no Caption column and {checkpoint} reads captions ({cfg.inputs}): every "
            "row is predicted " + ("from its image alone" if uses_images(cfg.inputs) else "from the label prior"))
    if uses_images(cfg.inputs):
        check_images_found(paths.images, image_urls(paths.images, ids), table=paths.test_csv)
    storage.check_writable(output)
    with hold(output, what="a prediction", log=log):
        log(f"predicting {len(ids)} images from {paths.test_csv} (images in {paths.images}) with {checkpoint} "
            f"({len(vocab)} labels, {cfg.image_size}px, threshold {choice.strategy})")
        if num_workers >= 1:
            out = scorer(state, ids, paths.images, cfg, len(vocab), num_workers=num_workers,
                         gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, batch_size=batch_size,
                         log=log, progress=progress, captions=captions, tokenizer=tokenizer)
        else:
            out = score_here(state, len(vocab), cfg, ids, paths.images, batch_size=batch_size,
                             loader_workers=loader_workers, log=log, progress=progress, captions=captions,
                             tokenizer=tokenizer)
        summary = write_predictions(output, ids, out["probs"], out["ok"], vocab, choice)
        summary.update(seconds=out["seconds"], img_per_s=out["img_per_s"])
        from mlc.train.replay import write_config
        # predict_config.json, not config.json: --output may be the training run's own folder, whose config.json
        # replays the training. Written last: a prediction that fails leaves the previous one's files as they were.
        write_config(output, "predict", name="predict_config.json", predict={
            "checkpoint": checkpoint, "data": data, "output": output, "ids": ids_csv, "images": images,
            "batch_size": batch_size, "num_workers": num_workers, "gpus_per_worker": gpus_per_worker,
            "cpus_per_worker": cpus_per_worker, "loader_workers": loader_workers, "local": num_workers == 0})
    log(f"wrote {storage.join(output, 'predictions.csv')} ({summary['rows']} rows, "
        f"{len(summary['unreadable'])} unreadable images)")
    return summary


def load_model(checkpoint: str, *, with_tokenizer: bool = False):
    """``(model, vocab)`` from a run folder, its ``best/`` or ``checkpoint/``, or a ``best/model.pt`` (its
    ``labels.json``, ``tokenizer.json`` and ``meta.json`` are read beside it), read with ``weights_only=True``;
    ``(model, vocab, tokenizer)`` with ``with_tokenizer`` (tokenizer None for an image-only network).

    The model is on the CPU in eval mode and gives one logit per label of ``vocab``. ``--inputs image``: the
    trained ResNet50, ``model(x)`` for ``x`` normalised as :func:`mlc.data.transforms.to_model_input` does (ImageNet
    mean and std). ``caption``: ``model(ids, offsets)``; ``image+caption``: ``model(x, ids, offsets)``, with
    ``ids, offsets = mlc.data.transforms.tokens_to_tensors(tokenizer.encode_many(captions), device)``.
    """
    url = model_folder(checkpoint)
    state, vocab, meta = load_model_checkpoint(url)
    cfg = TrainConfig.from_dict(meta["config"])
    tokenizer = tokenizer_of(meta, url)
    model = build(cfg.inputs, len(vocab),
                  num_tokens=tokenizer.size if tokenizer else 0, unfrozen_depth=cfg.unfrozen_depth,
                  dropout=cfg.dropout, weights=state, freeze_bn=cfg.freeze_bn)
    return (model.eval(), vocab, tokenizer) if with_tokenizer else (model.eval(), vocab)
