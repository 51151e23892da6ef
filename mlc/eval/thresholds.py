"""Decision thresholds: scores -> label sets, and the search for the rule with the best samples F1.

Four strategies (:data:`STRATEGIES`): a per-image percentile (the 2020 report's rule), one global
threshold, one global threshold that also keeps each image's top label, or one threshold per class.
``global`` and ``per_class`` predict nothing for an image whose scores are all below their cuts (an image
of none of the labels, which real data has); ``percentile`` and ``global_top1`` give every image at
least one label (COMP5329's every image has one). None is preferred for its kind: :func:`select_threshold`
scores every candidate on validation rows with the same samples F1, where an image with no true label
scores 1 only when nothing is predicted for it (:data:`mlc.eval.metrics.ZERO_DIVISION`), and returns a
:class:`ThresholdChoice`, which is saved with every model and applied to the test set. Conventions as in
:mod:`mlc.eval.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from mlc.eval.metrics import (_as_binary, _as_scores, _ranked_counts, _same_shape, _samples_f1, mean_average_precision,
                      prf)

__all__ = [
    "apply_threshold",
    "tune_per_class_thresholds",
    "ThresholdChoice",
    "select_threshold",
    "evaluate",
    "STRATEGIES",
    "PERCENTILE_GRID",
    "GLOBAL_GRID",
]


STRATEGIES = ("percentile", "global", "global_top1", "per_class")

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
    * ``"global_top1"``, value t: keep ``probs >= t`` and each image's highest score (ties at the top all
      kept), so every image keeps at least one class.
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
    if strategy == "global_top1":
        return _with_top1(p, p >= float(value))
    if strategy == "per_class":
        t = np.asarray(value, dtype=np.float64)
        if t.shape != (p.shape[1],):
            raise ValueError(
                f"per_class thresholds must have shape ({p.shape[1]},) to match probs {p.shape}, got {t.shape}"
            )
        return p >= t[None, :]
    raise ValueError(f"unknown threshold strategy {strategy!r}; expected one of {STRATEGIES}")


def _with_top1(p: np.ndarray, keep: np.ndarray) -> np.ndarray:
    return keep | (p >= p.max(axis=1, keepdims=True))


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
    threshold in :data:`GLOBAL_GRID` (alone, and with each image's top label
    kept), and per-class thresholds from :func:`tune_per_class_thresholds`.

    Fairness: a percentile or global threshold is one number picked from a
    grid, so its in-sample score is barely optimistic. Per-class tuning fits C
    numbers, each to maximise F1 on exactly these rows, so its in-sample score
    is biased upward (on pure noise it would still "win"). It is therefore
    judged by 2-fold cross-fitting (tune on even rows, score odd rows and vice
    versa) and, if it wins, refitted on all rows for the returned thresholds.

    Ties between strategies go to the simpler one (percentile, then global,
    then global_top1, then per_class): fewer parameters, less to go wrong on
    the test set.

    Returns ``(choice, curves)`` with ``curves`` ready for
    :func:`mlc.eval.plots.threshold_png`::

        {"percentile": {"values": [...], "f1_samples": [...]},
         "global": {"values": [...], "f1_samples": [...]},
         "global_top1": {"values": [...], "f1_samples": [...]},
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
    top1 = p >= p.max(axis=1, keepdims=True)
    top1_f1 = np.array([_samples_f1(yt, (p >= t) | top1) for t in glob_vals])

    pc_cv = _per_class_crossfit_f1(yt, p)
    pc_t = tune_per_class_thresholds(yt, p)
    pc_in = _samples_f1(yt, p >= np.asarray(pc_t)[None, :])

    i = _plateau_centre(pct_f1)
    j = _plateau_centre(glob_f1)
    k = _plateau_centre(top1_f1)
    choice = ThresholdChoice("percentile", float(pct_vals[i]), float(pct_f1[i]))
    if glob_f1[j] > choice.f1 + _TIE_EPS:
        choice = ThresholdChoice("global", float(glob_vals[j]), float(glob_f1[j]))
    if top1_f1[k] > choice.f1 + _TIE_EPS:
        choice = ThresholdChoice("global_top1", float(glob_vals[k]), float(top1_f1[k]))
    if pc_cv > choice.f1 + _TIE_EPS:
        choice = ThresholdChoice("per_class", pc_t, float(pc_cv))

    curves = {
        "percentile": {"values": pct_vals.tolist(), "f1_samples": pct_f1.tolist()},
        "global": {"values": glob_vals.tolist(), "f1_samples": glob_f1.tolist()},
        "global_top1": {"values": glob_vals.tolist(), "f1_samples": top1_f1.tolist()},
        "per_class": {"f1_samples": float(pc_cv), "f1_samples_in_sample": float(pc_in)},
    }
    return choice, curves


# --------------------------------------------------------------------------
# one-call evaluation


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
