"""A finished run's outputs: test predictions from the best model, plots, and the complete metrics.json.

Local mode calls ``finish`` in its own process; a Ray Train run calls it on the driver once the
best checkpoint has been copied to ``<run>/best``. Everything is read back from the run folder
(``best/``), so the outputs are the same whichever mode trained the model.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pandas as pd

from mlc.config import TrainConfig
from mlc.data.run_data import test_images
from mlc.data.table import captions_of
from mlc.eval import plots
from mlc.eval.metrics import ZERO_DIVISION, baseline_f1
from mlc.eval.thresholds import ThresholdChoice, select_threshold
from mlc.io import storage
from mlc.model.checkpoint import read_model, tokenizer_of
from mlc.prediction.scores import score_here
from mlc.prediction.submission import write_predictions

SCALAR_KEYS = ("f1_samples", "f1_micro", "f1_macro", "precision_samples", "recall_samples",
               "precision_micro", "recall_micro", "precision_macro", "recall_macro", "map")


# How every score in metrics.json treats empty label sets (mlc.eval.metrics), said beside the scores.
SCORING_RULES = {
    "zero_division": ZERO_DIVISION,
    "empty_truth_and_prediction": "an image with no true and no predicted label scores 1",
    "macro_and_map_over": "labels with at least one positive in the validation split (labels_without_positives "
                          "lists the others)",
}


def write_metrics(out: str, history: list, cfg, complete: bool, **extra) -> None:
    doc = {"complete": complete, "config": cfg.to_dict(), "epochs": history, **extra}
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(doc, indent=1, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def finish(cfg, out: str, data, history: list, bad_images: dict, *, device=None, precision: str | None = None,
           t_start: float | None = None, score_test=None, log=print, progress: bool = True, **extra) -> dict:
    """Predict the test table with ``out/best``, write predictions, plots and the complete metrics.json.

    ``score_test(best_url, ids, captions, tokenizer) -> {"probs", "ok"}`` scores the test images (on a Ray
    cluster's workers); by default they are scored in this process on ``device``.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    best_url = storage.join(out, "best")
    best_state, vocab, best_meta = read_model(best_url)
    choice = ThresholdChoice.from_dict(best_meta["threshold"])
    # What the network reads, as resolved when it trained (cfg may still say auto).
    cfg = cfg.replace(inputs=TrainConfig.from_dict(best_meta["config"]).inputs)
    tokenizer = tokenizer_of(best_meta, best_url)
    ids = data.test_df.ImageID.tolist()
    captions = captions_of(data.test_df) if tokenizer else None
    if score_test is None:
        scored = score_here(best_state, len(vocab), cfg, ids, test_images(data), batch_size=cfg.batch_size * 2,
                            loader_workers=cfg.loader_workers, device=device, log=log, progress=progress,
                            captions=captions, tokenizer=tokenizer)
        device, precision = scored["device"], precision or scored["precision"]
    else:
        # Scored on the cluster's workers, which report their own device and precision; this driver
        # never touches a GPU.
        scored = score_test(best_url, ids, captions, tokenizer)
    pred = write_predictions(out, ids, scored["probs"], scored["ok"], vocab, choice)
    # The epoch best/ holds (a kept checkpoint, whatever ties): not recomputed from the history.
    best_row = next((r for r in history if r["epoch"] == best_meta.get("epoch")), None) or \
        max(history, key=lambda r: r["f1_samples"])
    refit = best_meta["metrics"].get("refit")
    if refit:  # nothing held out: no validation scores, plots or baseline; the threshold is the run's
        storage.write_bytes(storage.join(out, "plots", "history.png"), plots.history_png(history))
        base = None
    else:
        base = baseline_f1([frozenset(data.train_df.Labels[i]) for i in data.tr], data.Y[data.va], vocab.index)
        write_plots(out, best_url, vocab, history, best_row, choice)
    summary = {
        "best_epoch": best_row["epoch"], "best": {k: best_row[k] for k in SCALAR_KEYS},
        **({"refit": refit} if refit else {}),
        "threshold": choice.to_dict(), "baseline_f1_samples": base, "scoring": SCORING_RULES,
        "labels_without_positives": best_row.get("labels_without_positives", []),
        "skipped_images": len(bad_images), "skipped": bad_images,
        "test": pred, **({"device": str(device)} if device is not None else {}), "amp": precision,
        "seconds": time.perf_counter() - t_start, **extra,
    }
    write_metrics(out, history, cfg, complete=True, **summary)
    if refit:
        log(f"refit of {refit['run']}: {best_row['epoch']} epochs on all {len(data.tr)} labelled rows; the threshold "
            f"is the one {refit['from']} chose on that run's validation split (samples F1 {refit['f1_samples']:.4f} "
            f"at its epoch {refit['epoch']})")
    else:
        log(f"best epoch {best_row['epoch']}: validation F1 (samples) {best_row['f1_samples']:.4f}, "
            f"micro {best_row['f1_micro']:.4f}, mAP {best_row['map']:.4f}; "
            f"baseline (always the most frequent label set) F1 {base:.4f}")
    log(f"threshold: {choice.strategy} {choice.value if choice.strategy != 'per_class' else '(per class)'}; "
        f"wrote {storage.join(out, 'predictions.csv')} ({pred['rows']} rows), metrics.json, best/, plots/")
    return summary


def write_plots(out: str, best_url: str, vocab, history: list, best_row: dict, choice: ThresholdChoice) -> None:
    """plots/: the history, the best epoch's per-class F1 and PR curves, and the threshold search on its
    validation scores (read back from best/, so the plots are the same whichever mode trained)."""
    val = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(best_url, "val_probabilities.csv"))))
    v_probs = val[vocab.labels].to_numpy(dtype=np.float32)
    v_true = val[[f"true_{c}" for c in vocab.labels]].to_numpy()
    v_ok = ~np.isnan(v_probs).any(axis=1)
    _, curves = select_threshold(v_true[v_ok], v_probs[v_ok])
    storage.write_bytes(storage.join(out, "plots", "history.png"), plots.history_png(history))
    storage.write_bytes(storage.join(out, "plots", "per_class_f1.png"),
                        plots.per_class_f1_png(vocab.labels, best_row["f1_per_class"], best_row["ap_per_class"]))
    storage.write_bytes(storage.join(out, "plots", "threshold.png"), plots.threshold_png(curves, choice))
    storage.write_bytes(storage.join(out, "plots", "pr_curves.png"),
                        plots.pr_curves_png(v_true[v_ok], v_probs[v_ok], vocab.labels))
