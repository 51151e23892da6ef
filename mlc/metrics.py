"""Multi-label metrics and decision thresholds, in plain numpy.

Why numpy and not scikit-learn: the training workers and the Kaggle submission
step must not need scikit-learn at runtime, and several things here (the
percentile / global threshold grids, per-class threshold tuning on 30,000 rows)
have to be vectorised to stay cheap. The tests check every number against
scikit-learn to 1e-6, so the definitions below *are* scikit-learn's.

Conventions for every function:

* ``y_true`` and ``y_pred`` are (N, C) arrays of 0/1 (bool or int), one row per
  image and one column per class.
* ``probs`` is an (N, C) float array of scores in [0, 1] (sigmoid outputs).
* A ratio 0/0 takes the value ``zero_division`` (0.0 by default, which is what
  Kaggle's samples-F1 does to an image whose prediction is empty).

The Kaggle metric is the *samples*-averaged F1: F1 computed per image between
its true and predicted label sets, then averaged over images.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "prf",
    "pr_curve",
    "average_precision",
    "mean_average_precision",
    "apply_threshold",
    "tune_per_class_thresholds",
    "ThresholdChoice",
    "select_threshold",
    "evaluate",
    "baseline_f1",
    "samples_f1",
    "STRATEGIES",
    "PERCENTILE_GRID",
    "GLOBAL_GRID",
]

STRATEGIES = ("percentile", "global", "per_class")

# Percentile grid 0, 0.5, ..., 99.5. With 18 classes the cut moves every
# 100/17 ~ 5.9 points, so a 0.5 step visits every "keep top-k" setting
# (k = 18 .. 1; 99.5 already keeps only the top 1, so 100 adds nothing).
PERCENTILE_GRID = tuple(float(p) for p in np.arange(0, 100, 0.5))

# Global thresholds 0.01 .. 0.99 in steps of 0.01, rounded so that 0.5 is
# exactly 0.5 and the values print and serialise cleanly.
GLOBAL_GRID = tuple(float(t) for t in np.round(np.arange(1, 100) * 0.01, 2))

# Two F1 values closer than this are a tie (they are means of ratios of
# small integers, so real differences are far larger).
_TIE_EPS = 1e-12


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


def prf(y_true, y_pred, zero_division: float = 0.0) -> dict:
    """Precision, recall and F1 under every averaging the project reports.

    Definitions (identical to scikit-learn's ``precision_score`` /
    ``recall_score`` / ``f1_score`` with the same ``zero_division``):

    * per class c: ``P_c = TP_c / (TP_c + FP_c)``, ``R_c = TP_c / (TP_c + FN_c)``,
      ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``. F1 is computed from the counts,
      not from P and R, so a class with TP = 0 but FP > 0 has F1 = 0 even when
      its recall is a 0/0.
    * ``micro``: the same formulas on the counts summed over all classes.
    * ``macro``: the unweighted mean of the per-class values over *all* C
      classes, including classes absent from the truth and never predicted
      (their 0/0 contributes ``zero_division``). This is why macro scores on a
      small split can look low: absent classes count as 0.
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
            out["precision_macro"] = float(p.mean())
            out["recall_macro"] = float(r.mean())
            out["f1_macro"] = float(f.mean())
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


def samples_f1(y_true, y_pred, zero_division: float = 0.0) -> float:
    """Just the samples-averaged F1 (the Kaggle score); see :func:`prf`."""
    yt = _as_binary(y_true, "y_true")
    yp = _as_binary(y_pred, "y_pred")
    _same_shape(yt, yp, "y_true", "y_pred")
    return _samples_f1(yt, yp, zero_division)


def _samples_f1(yt: np.ndarray, yp: np.ndarray, zero_division: float = 0.0) -> float:
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
# thresholds


def _percentile_cuts(probs: np.ndarray, qs) -> np.ndarray:
    """Per-image cut for each percentile in ``qs``: shape (len(qs), N).

    Both :func:`apply_threshold` and the grid search in
    :func:`select_threshold` go through this one call so that the chosen
    percentile reproduces exactly the predictions it was scored on.
    """
    return np.percentile(probs, np.asarray(qs, dtype=np.float64), axis=1)


def apply_threshold(probs, strategy: str, value) -> np.ndarray:
    """Turn scores into a boolean (N, C) prediction.

    * ``"percentile"``, value P in [0, 100]: per image, keep the classes whose
      score is >= ``np.percentile(row, P)`` (numpy's default linear
      interpolation). This is the 2020 report's "threshold percentile": P = 90
      keeps the top 2 of 18 or of 20 distinct scores. Ties at the cut are all
      kept, so a row whose scores are all equal keeps every class, and P = 0
      keeps everything. Every image keeps at least one class, which suits a
      dataset where every image has at least one label.
    * ``"global"``, value t: keep ``probs >= t``.
    * ``"per_class"``, value a list of C thresholds: keep ``probs[:, c] >= t[c]``.
    """
    p = _as_scores(probs)
    if strategy == "percentile":
        q = float(value)
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {value!r}")
        return p >= _percentile_cuts(p, [q])[0][:, None]
    if strategy == "global":
        return p >= float(value)
    if strategy == "per_class":
        t = np.asarray(value, dtype=np.float64)
        if t.shape != (p.shape[1],):
            raise ValueError(
                f"per_class thresholds must have shape ({p.shape[1]},) to match probs {p.shape}, got {t.shape}"
            )
        return p >= t[None, :]
    raise ValueError(f"unknown threshold strategy {strategy!r}; expected one of {STRATEGIES}")


def _never_threshold(col: np.ndarray) -> float:
    # Strictly above every score this column has (and above 1.0, the largest
    # possible probability), so ">= t" never fires; finite so it stays JSON.
    return float(np.nextafter(max(1.0, float(col.max())), np.inf))


def tune_per_class_thresholds(y_true, probs) -> list[float]:
    """Per class, the threshold that maximises that class's own F1 on these rows.

    Search: the candidate cuts are the distinct score values of the column
    ("predict when score >= v"), swept from the highest with one sort, so the
    cost is O(N log N) per class. Ties in F1 go to the higher cut (fewer
    predicted labels, the more conservative choice).

    Returned value: the midpoint between the winning score value v and the next
    lower distinct score in the column (or v itself when v is the column's
    minimum). Both give the same predictions on these rows, but the midpoint
    leaves a margin on both sides for unseen images instead of sitting exactly
    on the lowest accepted score.

    A class with no positive in ``y_true``: every cut has F1 0 (TP is 0), so
    the tie rule picks "predict nothing", returned as a threshold just above
    1.0 (and above the column's maximum). With no positive example we have no
    evidence for ever predicting the class, and each prediction would be a
    false positive on these rows.
    """
    yt = _as_binary(y_true, "y_true")
    p = _as_scores(probs)
    _same_shape(yt, p, "y_true", "probs")
    out = []
    for c in range(p.shape[1]):
        y, s = yt[:, c], p[:, c]
        n_pos = int(y.sum())
        if n_pos == 0:
            out.append(_never_threshold(s))
            continue
        thr, tp, pred = _ranked_counts(y, s)
        f1 = 2.0 * tp / (n_pos + pred)
        # thr is descending, so the first index reaching the maximum is the
        # highest cut among the ties. (Predicting nothing scores 0 < max here.)
        k = int(np.flatnonzero(f1 >= f1.max() - _TIE_EPS)[0])
        cut = float(thr[k]) if k + 1 == thr.size else float((thr[k] + thr[k + 1]) / 2.0)
        out.append(cut)
    return out


@dataclass
class ThresholdChoice:
    """A thresholding rule and the samples F1 it was judged to score.

    ``f1`` is the score used to pick it in :func:`select_threshold` (for
    ``per_class`` that is the cross-fitted estimate, not the in-sample score).
    """

    strategy: str
    value: float | list[float]
    f1: float = field(default=float("nan"))

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown threshold strategy {self.strategy!r}; expected one of {STRATEGIES}")

    def to_dict(self) -> dict:
        value = [float(v) for v in self.value] if self.strategy == "per_class" else float(self.value)
        return {"strategy": self.strategy, "value": value, "f1": float(self.f1)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ThresholdChoice":
        strategy = d["strategy"]
        value = [float(v) for v in d["value"]] if strategy == "per_class" else float(d["value"])
        return cls(strategy=strategy, value=value, f1=float(d.get("f1", float("nan"))))

    def apply(self, probs) -> np.ndarray:
        return apply_threshold(probs, self.strategy, self.value)


def _plateau_centre(scores: np.ndarray) -> int:
    """Index of the best grid value; among a run of equal best values, its middle.

    Neighbouring grid points often give the same F1 (e.g. every percentile
    between two ranks, or every global threshold in a gap between scores).
    The middle of that first plateau is the point farthest from where the
    score starts to drop, the safest choice for unseen data.
    """
    best = scores.max()
    is_best = scores >= best - _TIE_EPS
    start = int(np.argmax(is_best))
    end = start
    while end + 1 < scores.size and is_best[end + 1]:
        end += 1
    return (start + end) // 2


def _per_class_crossfit_f1(yt: np.ndarray, p: np.ndarray) -> float:
    """Samples F1 of per-class thresholds judged on rows they were not tuned on.

    Rows are split deterministically into even and odd indices; thresholds
    tuned on one half predict the other half, and the two halves' predictions
    are scored together.
    """
    even, odd = np.arange(0, yt.shape[0], 2), np.arange(1, yt.shape[0], 2)
    if odd.size == 0:  # a single row cannot be split; judge it in-sample
        t = tune_per_class_thresholds(yt, p)
        return _samples_f1(yt, p >= np.asarray(t)[None, :])
    pred = np.zeros_like(yt)
    for fit, score in ((even, odd), (odd, even)):
        t = np.asarray(tune_per_class_thresholds(yt[fit], p[fit]))
        pred[score] = p[score] >= t[None, :]
    return _samples_f1(yt, pred)


def select_threshold(y_true, probs) -> tuple[ThresholdChoice, dict]:
    """Pick the thresholding rule with the best samples F1 on these rows.

    Candidates: every percentile in :data:`PERCENTILE_GRID`, every global
    threshold in :data:`GLOBAL_GRID`, and per-class thresholds from
    :func:`tune_per_class_thresholds`.

    Fairness: a percentile or global threshold is one number picked from a
    grid, so its in-sample score is barely optimistic. Per-class tuning fits C
    numbers, each to maximise F1 on exactly these rows, so its in-sample score
    is biased upward (on pure noise it would still "win"). It is therefore
    judged by 2-fold cross-fitting (tune on even rows, score odd rows and vice
    versa) and, if it wins, refitted on all rows for the returned thresholds.

    Ties between strategies go to the simpler one (percentile, then global,
    then per_class): fewer parameters, less to go wrong on the test set.

    Returns ``(choice, curves)`` with ``curves`` ready for
    :func:`mlc.plots.threshold_png`::

        {"percentile": {"values": [...], "f1_samples": [...]},
         "global": {"values": [...], "f1_samples": [...]},
         "per_class": {"f1_samples": cross_fitted, "f1_samples_in_sample": x}}
    """
    yt = _as_binary(y_true, "y_true")
    p = _as_scores(probs)
    _same_shape(yt, p, "y_true", "probs")

    pct_vals = np.asarray(PERCENTILE_GRID)
    cuts = _percentile_cuts(p, pct_vals)  # (G, N), one sort of each row
    pct_f1 = np.array([_samples_f1(yt, p >= cut[:, None]) for cut in cuts])

    glob_vals = np.asarray(GLOBAL_GRID)
    glob_f1 = np.array([_samples_f1(yt, p >= t) for t in glob_vals])

    pc_cv = _per_class_crossfit_f1(yt, p)
    pc_t = tune_per_class_thresholds(yt, p)
    pc_in = _samples_f1(yt, p >= np.asarray(pc_t)[None, :])

    i = _plateau_centre(pct_f1)
    j = _plateau_centre(glob_f1)
    choice = ThresholdChoice("percentile", float(pct_vals[i]), float(pct_f1[i]))
    if glob_f1[j] > choice.f1 + _TIE_EPS:
        choice = ThresholdChoice("global", float(glob_vals[j]), float(glob_f1[j]))
    if pc_cv > choice.f1 + _TIE_EPS:
        choice = ThresholdChoice("per_class", pc_t, float(pc_cv))

    curves = {
        "percentile": {"values": pct_vals.tolist(), "f1_samples": pct_f1.tolist()},
        "global": {"values": glob_vals.tolist(), "f1_samples": glob_f1.tolist()},
        "per_class": {"f1_samples": float(pc_cv), "f1_samples_in_sample": float(pc_in)},
    }
    return choice, curves


# --------------------------------------------------------------------------
# one-call evaluation and the trivial baseline


def evaluate(y_true, probs, choice: ThresholdChoice | None = None) -> dict:
    """Every reported metric for one split, JSON-serialisable (nan allowed).

    With ``choice=None`` the threshold is selected on these same rows (fine
    for validation; for a test split pass the choice made on validation).
    Returns the :func:`prf` keys at that threshold plus ``map``,
    ``ap_per_class`` (threshold-free) and ``threshold`` (``choice.to_dict()``).
    """
    yt = _as_binary(y_true, "y_true")
    p = _as_scores(probs)
    _same_shape(yt, p, "y_true", "probs")
    if choice is None:
        choice, _ = select_threshold(yt, p)
    out = prf(yt, choice.apply(p))
    out["map"], out["ap_per_class"] = mean_average_precision(yt, p)
    out["threshold"] = choice.to_dict()
    return out


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
