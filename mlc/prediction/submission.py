"""The files a prediction writes: ``predictions.csv`` (the Kaggle submission) and ``probabilities.csv``.

Every way of predicting (local training's validation and test, Ray Train's checkpoints, in-process and
Ray Data prediction) writes through :func:`write_predictions`, so the files are the same whichever wrote them.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from mlc.io import storage
from mlc.data.labels import LabelVocab
from mlc.data.table import submission_csv
from mlc.eval.thresholds import ThresholdChoice


def write_predictions(output: str, ids, probs: np.ndarray, ok: np.ndarray, vocab: LabelVocab,
                      choice: ThresholdChoice, *, prefix: str = "", truth: np.ndarray | None = None) -> dict:
    """Write ``<prefix>predictions.csv`` (Kaggle format, original label strings, input order) and
    ``<prefix>probabilities.csv`` (with ``true_<label>`` columns when ``truth`` is given)."""
    ids = list(ids)
    # (no rows: a refit's validation files, header only)
    decided = choice.apply(np.nan_to_num(probs, nan=0.0)) if len(ids) else np.zeros(probs.shape, dtype=bool)
    decided[~ok] = False
    storage.write_text(storage.join(output, prefix + "predictions.csv"), submission_csv(ids, vocab.decode(decided)))
    table = pd.DataFrame(probs, columns=vocab.labels)
    table.insert(0, "ImageID", ids)
    if truth is not None:
        table = pd.concat([table, pd.DataFrame(truth.astype(np.int8), columns=[f"true_{c}" for c in vocab.labels])],
                          axis=1)
    buf = io.StringIO()
    table.to_csv(buf, index=False, float_format="%.6f")  # NaN (unreadable image) is written as an empty cell
    storage.write_text(storage.join(output, prefix + "probabilities.csv"), buf.getvalue())
    return {"rows": len(ids), "unreadable": [i for i, good in zip(ids, ok) if not good],
            "empty_predictions": int((~decided.any(axis=1)).sum())}
