"""Local mode: train, validate, checkpoint, resume and write every output, in this process, without Ray."""

from __future__ import annotations

import io
import json
import math
import time

import numpy as np
import pandas as pd
import torch

from . import plots, storage
from .checkpoint import (load_model_checkpoint, load_training_state, rng_state, save_model,
                         save_training_state, set_rng_state)
from .config import TrainConfig
from .data import BadImageBudget, DataPaths, ImageTable, image_urls, make_loader, read_tables, split_train_val
from .engine import make_optimizer, pick_amp_dtype, predict_scores, train_one_epoch, warmup_cosine
from .labels import LabelVocab
from .metrics import ThresholdChoice, baseline_f1, evaluate, select_threshold
from .model import bare_state_dict, build_model, trainable_parameter_groups
from .predict import pick_device, score_ids, write_predictions
from .transforms import eval_transform, train_transform

# Everything a run writes under --output; --fresh removes these first so nothing stale survives.
OUTPUTS = ("checkpoint", "best", "metrics.json", "predictions.csv", "probabilities.csv", "plots")
SCALAR_KEYS = ("f1_samples", "f1_micro", "f1_macro", "precision_samples", "recall_samples",
               "precision_micro", "recall_micro", "precision_macro", "recall_macro", "map")


class ConfigMismatch(ValueError):
    pass


def fit(cfg: TrainConfig, *, fresh: bool = False, log=print, progress: bool = True) -> dict:
    t_start = time.perf_counter()
    if cfg.data is None:
        from .demo import make_demo_dataset
        cfg = cfg.replace(data=make_demo_dataset())
        log(f"no --data given: using the embedded demo dataset at {cfg.data}")
    paths = DataPaths.resolve(cfg.data, cfg.images, cfg.train_csv, cfg.test_csv)
    out = cfg.output
    storage.check_writable(out)
    if fresh:
        for name in OUTPUTS:
            storage.remove(storage.join(out, name), recursive=True)

    train_df, test_df = read_tables(paths)
    vocab = LabelVocab.from_label_lists(train_df.Labels)
    Y = vocab.encode(train_df.Labels, context=f"{paths.train_csv}: ")
    tr, va = split_train_val(train_df.ImageID, cfg.val_fraction, cfg.seed)
    log(f"data: {len(train_df)} labelled ({len(tr)} train / {len(va)} validation), {len(test_df)} test, "
        f"{len(vocab)} labels")

    ckpt_url, best_url = storage.join(out, "checkpoint"), storage.join(out, "best")
    state = load_training_state(ckpt_url)
    if state is not None:
        _check_resumable(state, cfg, vocab, ckpt_url)

    device = pick_device()
    amp_dtype = pick_amp_dtype(cfg.amp, device)
    torch.manual_seed(cfg.seed)
    model = build_model(len(vocab), cfg.unfrozen_depth, cfg.dropout,
                        weights=state["model"] if state else cfg.weights, log=log)
    model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(trainable_parameter_groups(model, cfg.weight_decay), cfg.optimizer, cfg.lr, cfg.momentum)
    # drop_last keeps a 1-image final batch away from BatchNorm (it cannot normalise one value per channel).
    drop_last = len(tr) > cfg.batch_size
    steps_per_epoch = len(tr) // cfg.batch_size if drop_last else 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps_per_epoch * cfg.epochs, max(1, int(cfg.warmup_epochs * steps_per_epoch))))

    history, best_f1, start_epoch = [], -math.inf, 1
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        history, best_f1, start_epoch = state["history"], state["best_f1"], state["epoch"] + 1
        if start_epoch > cfg.epochs:
            log(f"resuming: {ckpt_url} has finished all {state['epoch']} epochs; writing the outputs")
        else:
            log(f"resuming from {ckpt_url}: epoch {state['epoch']} done, continuing at epoch {start_epoch}")

    urls = image_urls(paths.images, train_df.ImageID)
    train_ds = ImageTable([urls[i] for i in tr], Y[tr], train_transform(cfg.image_size), cfg.max_image_pixels)
    val_ds = ImageTable([urls[i] for i in va], Y[va], eval_transform(cfg.image_size), cfg.max_image_pixels)
    budget = BadImageBudget(len(train_df), cfg.max_bad_fraction, log=log)
    if state is not None:
        budget.bad.update(state.get("bad_images", {}))
    pin = device.type == "cuda"

    for epoch in range(start_epoch, cfg.epochs + 1):
        loader = make_loader(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                             num_workers=cfg.num_workers, pin_memory=pin, drop_last=drop_last)
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(model, loader, optimizer, scheduler, device, epoch=epoch, amp_dtype=amp_dtype,
                                clip_grad=cfg.clip_grad, bad_images=budget, progress=progress,
                                desc=f"epoch {epoch}/{cfg.epochs}")
        val_loader = make_loader(val_ds, cfg.batch_size * 2, shuffle=False, num_workers=cfg.num_workers,
                                 pin_memory=pin)
        scored = predict_scores(model, val_loader, device, amp_dtype=amp_dtype, progress=progress, desc="validate")
        budget.add(scored["skipped"])
        ok = scored["ok"]
        metrics = evaluate(Y[va][ok], scored["probs"][ok])
        row = {"epoch": epoch, "lr": lr, **stats, "val_loss": scored["loss"], "val_images": int(ok.sum()),
               "val_img_per_s": scored["img_per_s"], **{k: metrics[k] for k in SCALAR_KEYS},
               "threshold": metrics["threshold"], "f1_per_class": metrics["f1_per_class"],
               "ap_per_class": metrics["ap_per_class"], "skipped_images": len(budget.bad)}
        history.append(row)
        if metrics["f1_samples"] > best_f1:
            best_f1 = metrics["f1_samples"]
            save_model(best_url, bare_state_dict(model), vocab, {
                "config": cfg.to_dict(), "threshold": metrics["threshold"], "epoch": epoch,
                "metrics": {k: metrics[k] for k in SCALAR_KEYS}})
            # The best epoch's validation scores and predictions, to plot and to score later.
            write_predictions(best_url, train_df.ImageID.values[va], scored["probs"], ok, vocab,
                              ThresholdChoice.from_dict(metrics["threshold"]), prefix="val_", truth=Y[va])
        save_training_state(ckpt_url, {
            "model": bare_state_dict(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "rng": rng_state(), "best_f1": best_f1,
            "history": history, "config": cfg.to_dict(), "labels": vocab.labels,
            "threshold": metrics["threshold"], "bad_images": dict(budget.bad)})
        _write_metrics(out, history, cfg, complete=False)
        log(f"epoch {epoch}/{cfg.epochs}: train loss {stats['train_loss']:.4f} ({stats['train_img_per_s']:.1f} img/s), "
            f"val loss {scored['loss']:.4f}, F1 samples {metrics['f1_samples']:.4f} micro {metrics['f1_micro']:.4f} "
            f"macro {metrics['f1_macro']:.4f}, mAP {metrics['map']:.4f} "
            f"[{metrics['threshold']['strategy']}]")

    return _finish(cfg, paths, out, model, device, amp_dtype, train_df, test_df, vocab, Y, tr, va, history,
                   budget, t_start, log, progress)


def _check_resumable(state: dict, cfg: TrainConfig, vocab: LabelVocab, url: str) -> None:
    saved = TrainConfig.from_dict(state["config"])
    diff = cfg.differences(saved)
    if diff:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ConfigMismatch(f"{url} holds a run with other settings ({listed}); rerun with the same flags to "
                             "resume, add --fresh to start over, or choose another --output")
    if state["labels"] != vocab.labels:
        raise ConfigMismatch(f"{url} was trained on labels {state['labels']}, the data now has {vocab.labels}; "
                             "use --fresh or another --output")


def _write_metrics(out: str, history: list, cfg: TrainConfig, complete: bool, **extra) -> None:
    doc = {"complete": complete, "config": cfg.to_dict(), "epochs": history, **extra}
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(doc, indent=1, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _finish(cfg, paths, out, model, device, amp_dtype, train_df, test_df, vocab, Y, tr, va, history, budget,
            t_start, log, progress) -> dict:
    best_state, _, best_meta = load_model_checkpoint(storage.join(out, "best"))
    model.load_state_dict(best_state)
    choice = ThresholdChoice.from_dict(best_meta["threshold"])

    scored = score_ids(model, test_df.ImageID.tolist(), paths.images, image_size=cfg.image_size, device=device,
                       amp_dtype=amp_dtype, batch_size=cfg.batch_size * 2, num_workers=cfg.num_workers,
                       max_pixels=cfg.max_image_pixels, log=log, progress=progress)
    pred = write_predictions(out, test_df.ImageID.tolist(), scored["probs"], scored["ok"], vocab, choice)

    val = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(out, "best", "val_probabilities.csv"))))
    v_probs = val[vocab.labels].to_numpy(dtype=np.float32)
    v_true = val[[f"true_{c}" for c in vocab.labels]].to_numpy()
    v_ok = ~np.isnan(v_probs).any(axis=1)
    _, curves = select_threshold(v_true[v_ok], v_probs[v_ok])
    best_row = max(history, key=lambda r: r["f1_samples"])
    base = baseline_f1([frozenset(train_df.Labels[i]) for i in tr], Y[va], vocab.index)

    storage.write_bytes(storage.join(out, "plots", "history.png"), plots.history_png(history))
    storage.write_bytes(storage.join(out, "plots", "per_class_f1.png"),
                        plots.per_class_f1_png(vocab.labels, best_row["f1_per_class"], best_row["ap_per_class"]))
    storage.write_bytes(storage.join(out, "plots", "threshold.png"), plots.threshold_png(curves, choice))
    storage.write_bytes(storage.join(out, "plots", "pr_curves.png"),
                        plots.pr_curves_png(v_true[v_ok], v_probs[v_ok], vocab.labels))

    summary = {
        "best_epoch": best_row["epoch"], "best": {k: best_row[k] for k in SCALAR_KEYS},
        "threshold": choice.to_dict(), "baseline_f1_samples": base,
        "skipped_images": len(budget.bad), "skipped": budget.bad,
        "test": pred, "device": str(device), "amp": str(amp_dtype), "seconds": time.perf_counter() - t_start,
    }
    _write_metrics(out, history, cfg, complete=True, **summary)
    log(f"best epoch {best_row['epoch']}: validation F1 (samples) {best_row['f1_samples']:.4f}, "
        f"micro {best_row['f1_micro']:.4f}, mAP {best_row['map']:.4f}; "
        f"baseline (always the most frequent label set) F1 {base:.4f}")
    log(f"threshold: {choice.strategy} {choice.value if choice.strategy != 'per_class' else '(per class)'}; "
        f"wrote {storage.join(out, 'predictions.csv')} ({pred['rows']} rows), metrics.json, best/, plots/")
    return summary
