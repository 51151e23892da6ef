"""Predicting with a saved model: what a checkpoint needs to predict (:func:`load_predictor`), a table predicted
from a checkpoint alone (:func:`predict_from_checkpoint`, in this process or on Ray Data actors through
:mod:`mlc.distributed.predict`; ``mlc.predict`` and jobs/predict.py call it), and the trained network itself
(:func:`load_model`)."""

from __future__ import annotations

from mlc.config import TrainConfig, uses_images
from mlc.data.run_data import DataPaths, check_images_found, image_urls
from mlc.data.pack import check_side, is_pack, open_pack, read_frame
from mlc.data.pack_source import locate_ids
from mlc.data.table import captions_of, read_ids_captions
from mlc.errors import UsageError
from mlc.eval.thresholds import ThresholdChoice
from mlc.io import storage
from mlc.io.config_json import write_config
from mlc.io.lock import hold
from mlc.model.checkpoint import model_folder, read_model, tokenizer_of
from mlc.model.fusion import build
from mlc.prediction.scores import score_here
from mlc.prediction.submission import write_predictions


def load_predictor(url: str, *, with_meta: bool = False) -> tuple:
    """What predicting with a checkpoint needs: ``(state_dict, vocab, config, threshold, tokenizer)`` (the
    tokenizer None for an image-only network), and ``meta`` (epoch, sha256, ...) last with ``with_meta``; see
    :func:`mlc.model.checkpoint.read_model` for the folders accepted. A checkpoint saved before its first
    validation holds no threshold and is refused."""
    url = model_folder(url)
    state, vocab, meta = read_model(url)
    if meta.get("threshold") is None:
        raise ValueError(f"{url}: holds no threshold (it predates its first validation); use best/")
    out = (state, vocab, TrainConfig.from_dict(meta["config"]), ThresholdChoice.from_dict(meta["threshold"]),
           tokenizer_of(meta, url))
    return out + (meta,) if with_meta else out


def predict_from_checkpoint(checkpoint: str, data: str | None = None, output: str | None = None, *,
                            ids_csv: str | None = None,
                            images: str | None = None, batch_size: int = 64, num_workers: int = 0,
                            loader_workers: int | None = None, gpus_per_worker: float | None = None,
                            cpus_per_worker: float | None = None, log=print, progress: bool = True,
                            scorer=None, report=None, tta: str | None = None) -> dict:
    """Predict test.csv (or any table with an ImageID column) with label vocabulary, image size and
    threshold taken from the checkpoint alone.

    ``num_workers`` 0 scores in this process (``loader_workers`` DataLoader processes read the images);
    ``num_workers`` N >= 1 hands them to ``scorer`` (called as :func:`mlc.distributed.predict.score_distributed`
    is: N Ray Data actors on the cluster in RAY_ADDRESS, or a local Ray, each with ``gpus_per_worker`` GPUs,
    default 1 when the cluster has GPUs, else 0); :func:`mlc.distributed.predict.predict` passes that one.
    Without ``images`` the image folder is the one the checkpoint was trained with, resolved against
    ``data`` (default: the checkpoint's dataset root). ``tta`` (none, flip; default: the model's own, as it
    was validated) is the test-time augmentation. ``report(output, checkpoint=, predicted=, log=)`` writes
    report.html once the predictions are written, before predict_config.json (:func:`mlc.distributed.predict.predict`
    passes :func:`mlc.report.build.try_write_report`). Returns the summary: rows, unreadable ImageIDs, rows with no
    label, seconds, images per second, and ``report`` (its path, or None).
    """
    if output is None:
        raise TypeError("predict needs output=: the folder for predictions.csv and probabilities.csv")
    if num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {num_workers}")
    if num_workers >= 1 and scorer is None:
        raise TypeError("num_workers >= 1 scores on Ray: call mlc.predict (mlc.distributed.predict.predict), "
                        "which passes the Ray Data scorer")
    state, vocab, cfg, choice, tokenizer = load_predictor(checkpoint)
    cfg = cfg.replace(tta=tta) if tta is not None else cfg  # (a value other than none or flip: a ValueError)
    data = data or cfg.data
    if data is None:
        raise UsageError(f"{checkpoint}: its config names no dataset root; pass --data")
    packed = is_pack(data)
    paths = DataPaths.resolve(data, images=images if images is not None or packed else cfg.images, test_csv=ids_csv)
    ids, captions, where = _rows_to_predict(paths, cfg, checkpoint, tokenizer is not None, log)
    storage.check_writable(output)
    with hold(output, what="a prediction", log=log):
        log(f"predicting {len(ids)} images from {paths.test_csv} (images in {paths.images}) with {checkpoint} "
            f"({len(vocab)} labels, {cfg.image_size}px, threshold {choice.strategy}"
            f"{', test-time augmentation ' + cfg.tta if cfg.tta != 'none' else ''})")
        common = dict(batch_size=batch_size, log=log, progress=progress, captions=captions, tokenizer=tokenizer)
        if scorer is None:
            out = score_here(state, len(vocab), cfg, ids, where, loader_workers=loader_workers, **common)
        else:
            out = scorer(state, len(vocab), cfg, ids, where, num_workers=num_workers,
                         gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, **common)
        summary = write_predictions(output, ids, out["probs"], out["ok"], vocab, choice)
        summary.update(seconds=out["seconds"], img_per_s=out["img_per_s"])
        recorded = {"checkpoint": checkpoint, "data": data, "output": output, "ids": ids_csv, "images": images,
                    "batch_size": batch_size, "num_workers": num_workers, "gpus_per_worker": gpus_per_worker,
                    "cpus_per_worker": cpus_per_worker, "loader_workers": loader_workers, "local": num_workers == 0,
                    "tta": cfg.tta}
        summary["report"] = report(output, model=checkpoint, predicted=recorded, log=log) if report else None
        # predict_config.json, not config.json: --output may be the training run's own folder, whose config.json
        # replays the training. Written last: a prediction that fails leaves the previous one's files as they were.
        write_config(output, "predict", name="predict_config.json", predict=recorded)
    log(f"wrote {storage.join(output, 'predictions.csv')} ({summary['rows']} rows, "
        f"{len(summary['unreadable'])} unreadable images)")
    return summary


def _rows_to_predict(paths: DataPaths, cfg: TrainConfig, checkpoint: str, reads_captions: bool, log) -> tuple:
    """The ImageIDs and captions of the table to predict, and where their images are: the image folder (checked
    to hold them), or their rows in the pack ``paths.pack`` (:class:`mlc.data.pack_source.PackedImages`)."""
    pack = open_pack(paths.pack) if paths.pack is not None else None
    if pack is not None and paths.test_csv == storage.join(pack.url, "test"):
        frame = read_frame(pack, "test")
        ids, captions = list(frame.ImageID), (captions_of(frame) if "Caption" in frame.columns else None)
    else:
        ids, captions = read_ids_captions(paths.test_csv)
    if reads_captions and captions is None:
        log(f"warning: {paths.test_csv} has no Caption column and {checkpoint} reads captions ({cfg.inputs}): every "
            "row is predicted " + ("from its image alone" if uses_images(cfg.inputs) else "from the label prior"))
    if not uses_images(cfg.inputs):
        return ids, captions, paths.images
    if pack is not None:
        check_side(pack, cfg.image_size)
        return ids, captions, locate_ids(pack, ids)
    check_images_found(paths.images, image_urls(paths.images, ids), table=paths.test_csv)
    return ids, captions, paths.images


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
    state, vocab, meta = read_model(url)
    cfg = TrainConfig.from_dict(meta["config"])
    tokenizer = tokenizer_of(meta, url)
    model = build(cfg.inputs, len(vocab), model=cfg.model,
                  num_tokens=tokenizer.size if tokenizer else 0, unfrozen_depth=cfg.unfrozen_depth,
                  dropout=cfg.dropout, weights=state, freeze_bn=cfg.freeze_bn)
    return (model.eval(), vocab, tokenizer) if with_tokenizer else (model.eval(), vocab)
