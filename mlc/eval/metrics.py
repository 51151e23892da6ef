"""Multi-label metrics in plain numpy: precision, recall and F1 (samples, micro, macro), AP and mAP, the baseline.

Why numpy and not scikit-learn: the training workers and the Kaggle submission
step must not need scikit-learn at runtime, and some of this (the threshold
grids of :mod:`mlc.eval.thresholds`, per-class tuning on 30,000 rows) has to be
vectorised to stay cheap. The tests check every number against scikit-learn to
1e-6, so the definitions below *are* scikit-learn's.

Conventions for every function (here and in :mod:`mlc.eval.thresholds`):

* ``y_true`` and ``y_pred`` are (N, C) arrays of 0/1 (bool or int), one row per
  image and one column per class.
* ``probs`` is an (N, C) float array of scores in [0, 1] (sigmoid outputs).
* A ratio 0/0 takes the value ``zero_division``, :data:`ZERO_DIVISION` (1) everywhere mlc scores
  (validation, threshold search, Tune, ``jobs/score.py``): scikit-learn's ``zero_division=1``.
* An image with no true label and no predicted label scores 1: "none of these labels" is a correct
  answer, and with 0 the threshold search could never prefer predicting nothing for such an image.
  An image with true labels and none predicted (or the reverse) scores F1 0, whatever the rule.
* Macro averages and mAP run over the labels with at least one positive in the truth (scikit-learn's
  ``labels=`` restricted to them): a label absent from a validation split has no recall to average, and
  counting it as 0 or 1 would move macro scores by a split's luck. ``labels_without_positives`` names
  the labels left out.

The Kaggle metric is the *samples*-averaged F1: F1 computed per image between
its true and predicted label sets, then averaged over images.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "ZERO_DIVISION",
    "prf",
    "pr_curve",
    "average_precision",
    "mean_average_precision",
    "baseline_f1",
    "samples_f1",
    "f1_per_sample",
]


# The value of every 0/0 (see the module docstring): an image with neither true nor predicted labels scores 1.
ZERO_DIVISION = 1.0


# --------------------------------------------------------------------------
# validation helpers


def _as_binary(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, C) array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must contain only 0/1 values")
        arr = arr.astype(bool)
    return arr


def _as_scores(a, name: str = "probs") -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, C) array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _same_shape(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{na} has shape {a.shape} but {nb} has shape {b.shape}; they must match")


def _divide(num, den, zero_division: float) -> np.ndarray:
    """num / den elementwise, with ``zero_division`` where den == 0 (no warnings)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, float(zero_division))
    np.divide(num, den, out=out, where=den != 0)
    return out


# --------------------------------------------------------------------------
# precision / recall / F1


def prf(y_true, y_pred, zero_division: float = ZERO_DIVISION) -> dict:
    """Precision, recall and F1 under every averaging the project reports.

    Definitions (identical to scikit-learn's ``precision_score`` /
    ``recall_score`` / ``f1_score`` with the same ``zero_division``):

    * per class c: ``P_c = TP_c / (TP_c + FP_c)``, ``R_c = TP_c / (TP_c + FN_c)``,
      ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``. F1 is computed from the counts,
      not from P and R, so a class with TP = 0 but FP > 0 has F1 = 0 even when
      its recall is a 0/0.
    * ``micro``: the same formulas on the counts summed over all classes.
    * ``macro``: the unweighted mean of the per-class values over the classes
      with at least one positive in the truth (scikit-learn's ``labels=``
      set to them); ``labels_without_positives`` lists the others' column
      indices, and the macro values are NaN when every class is absent.
      Their false positives still count in micro and samples scores.
    * ``samples``: the same formulas per image (row) between its true and
      predicted label sets, averaged over images. This is the Kaggle metric.
      An image with no predicted label has precision 0/0 -> ``zero_division``
      and F1 0 (if it has true labels); an image with neither true nor
      predicted labels gets ``zero_division`` for all three.

    ``support_per_class`` is the number of images whose truth contains the
    class (TP + FN), as an int, matching scikit-learn's ``support``.

    Returns a dict of floats (``*_micro``, ``*_macro``, ``*_samples``) and lists
    (``*_per_class``), all JSON-serialisable.
    """
    yt = _as_binary(y_true, "y_true")
    yp = _as_binary(y_pred, "y_pred")
    _same_shape(yt, yp, "y_true", "y_pred")
    zd = float(zero_division)

    tp_mat = yt & yp
    out: dict = {}
    # axis 0: per class; axis 1: per image (samples)
    for name, axis in (("per_class", 0), ("samples", 1)):
        tp = tp_mat.sum(axis=axis)
        pred = yp.sum(axis=axis)
        true = yt.sum(axis=axis)
        p = _divide(tp, pred, zd)
        r = _divide(tp, true, zd)
        f = _divide(2 * tp, true + pred, zd)
        if name == "per_class":
            out["precision_per_class"] = [float(x) for x in p]
            out["recall_per_class"] = [float(x) for x in r]
            out["f1_per_class"] = [float(x) for x in f]
            out["support_per_class"] = [int(x) for x in true]
            present = true > 0
            out["labels_without_positives"] = [int(c) for c in np.flatnonzero(~present)]
            for key, values in (("precision_macro", p), ("recall_macro", r), ("f1_macro", f)):
                out[key] = float(values[present].mean()) if present.any() else float("nan")
            # micro = the per-class counts summed
            tps, preds, trues = tp.sum(), pred.sum(), true.sum()
            out["precision_micro"] = float(_divide(tps, preds, zd))
            out["recall_micro"] = float(_divide(tps, trues, zd))
            out["f1_micro"] = float(_divide(2 * tps, trues + preds, zd))
        else:
            out["precision_samples"] = float(p.mean())
            out["recall_samples"] = float(r.mean())
            out["f1_samples"] = float(f.mean())
    return out


def samples_f1(y_true, y_pred, zero_division: float = ZERO_DIVISION) -> float:
    """Just the samples-averaged F1 (the Kaggle score); see :func:`prf`."""
    yt = _as_binary(y_true, "y_true")
    yp = _as_binary(y_pred, "y_pred")
    _same_shape(yt, yp, "y_true", "y_pred")
    return _samples_f1(yt, yp, zero_division)


def f1_per_sample(y_true, y_pred, zero_division: float = ZERO_DIVISION) -> np.ndarray:
    """Each image's F1 between its true and predicted label sets (the terms :func:`samples_f1` averages): an
    image with neither scores ``zero_division``. Equal to scikit-learn's ``f1_score`` of each row alone."""
    yt = _as_binary(y_true, "y_true")
    yp = _as_binary(y_pred, "y_pred")
    _same_shape(yt, yp, "y_true", "y_pred")
    tp = np.count_nonzero(yt & yp, axis=1)
    return _divide(2 * tp, np.count_nonzero(yt, axis=1) + np.count_nonzero(yp, axis=1), zero_division)


def _samples_f1(yt: np.ndarray, yp: np.ndarray, zero_division: float = ZERO_DIVISION) -> float:
    # Unvalidated fast path for the threshold searches.
    tp = np.count_nonzero(yt & yp, axis=1)
    den = np.count_nonzero(yt, axis=1) + np.count_nonzero(yp, axis=1)
    return float(_divide(2 * tp, den, zero_division).mean())


# --------------------------------------------------------------------------
# ranking metrics


def _as_column_pair(y_true_col, score_col) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true_col)
    s = np.asarray(score_col, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(
            f"y_true_col and score_col must be 1-D of equal length, got shapes {y.shape} and {s.shape}"
        )
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("y_true_col must contain only 0/1 values")
        y = y.astype(bool)
    if not np.isfinite(s).all():
        raise ValueError("score_col contains NaN or infinite values")
    return y, s


def _ranked_counts(y: np.ndarray, s: np.ndarray):
    """Cumulative (tp, predicted) at each distinct score, highest first.

    Sorting once makes every threshold sweep O(N log N). Rows with tied scores
    are always kept or dropped together, so only the last row of each run of
    ties is a possible cut.
    """
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    tp = np.cumsum(y[order], dtype=np.int64)
    ends = np.flatnonzero(np.diff(s_sorted) != 0)
    ends = np.append(ends, s_sorted.size - 1)
    return s_sorted[ends], tp[ends], ends + 1


def pr_curve(y_true_col, score_col):
    """Precision-recall points, one per distinct score (highest threshold first).

    Returns ``(precision, recall, thresholds)`` where entry n is "predict
    positive when score >= thresholds[n]". Unlike scikit-learn, no artificial
    (recall 0, precision 1) end point is appended; plots add it if they want.
    A column with no positive has recall 0/0, returned as 0.
    """
    y, s = _as_column_pair(y_true_col, score_col)
    thr, tp, pred = _ranked_counts(y, s)
    n_pos = int(y.sum())
    precision = tp / pred
    recall = tp / n_pos if n_pos else np.zeros_like(precision)
    return precision, recall, thr


def average_precision(y_true_col, score_col) -> float:
    """Average precision of one class: ``sum_n (R_n - R_{n-1}) P_n``.

    The sum runs over the distinct score values in descending order (tied
    scores form one threshold, as in scikit-learn's
    ``average_precision_score``), with ``R_0 = 0``. This is the step-wise area
    under the PR curve, not an interpolated one.

    A class with no positive returns ``nan``: its AP is undefined (every
    recall is 0/0). scikit-learn instead warns and returns a number that
    depends on its version; we prefer a value that averaging code must skip
    explicitly (see :func:`mean_average_precision`).
    """
    y, s = _as_column_pair(y_true_col, score_col)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    _, tp, pred = _ranked_counts(y, s)
    recall = tp / n_pos
    precision = tp / pred
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def mean_average_precision(y_true, probs) -> tuple[float, list]:
    """mAP over classes with at least one positive, and the per-class APs.

    Classes absent from ``y_true`` get ``nan`` in the list and are left out of
    the mean (their AP is undefined); if no class has a positive the mean is
    ``nan``.
    """
    yt = _as_binary(y_true, "y_true")
    p = _as_scores(probs)
    _same_shape(yt, p, "y_true", "probs")
    aps = [average_precision(yt[:, c], p[:, c]) for c in range(yt.shape[1])]
    present = [a for a in aps if not np.isnan(a)]
    mean = float(np.mean(present)) if present else float("nan")
    return mean, aps


# --------------------------------------------------------------------------
# the trivial baseline


def baseline_f1(
    train_label_sets: Sequence[Iterable],
    y_true_val,
    label_index: Mapping,
) -> float:
    """Samples F1 on validation of always predicting the commonest training label set.

    The model has to beat this to have learnt anything beyond the label
    prior. Ties in frequency go to the set seen first in ``train_label_sets``
    (``Counter.most_common`` keeps first-seen order among equal counts).
    ``label_index`` maps each label to its column in ``y_true_val``.
    """
    yt = _as_binary(y_true_val, "y_true_val")
    if len(train_label_sets) == 0:
        raise ValueError("train_label_sets is empty; there is no most frequent label set")
    counts = Counter(frozenset(s) for s in train_label_sets)
    top, _ = counts.most_common(1)[0]
    row = np.zeros(yt.shape[1], dtype=bool)
    for label in top:
        if label not in label_index:
            raise ValueError(f"label {label!r} from train_label_sets is not in label_index")
        col = int(label_index[label])
        if not 0 <= col < yt.shape[1]:
            raise ValueError(f"label_index[{label!r}] = {col} is outside y_true_val's {yt.shape[1]} columns")
        row[col] = True
    return _samples_f1(yt, np.broadcast_to(row, yt.shape))
