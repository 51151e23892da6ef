"""What a report shows of a model's scores, arrays in and rows out: the per-class table, the validation images the
model gets wrong (worst first), which labels it predicts when another is true (the multi-label confusion view) and
a sample of its test predictions. Every score comes from :mod:`mlc.eval` (the functions training reports with)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlc.eval.metrics import f1_per_sample, mean_average_precision, prf
from mlc.eval.thresholds import ThresholdChoice

# The scores a card lists: with 18 labels and one to three true ones, the top five show the runners-up too.
TOP_SCORES = 5
# Scores are read back from CSV files with 6 decimals: 0 and 1 occur, and log(0) would rank an image by infinity.
LOSS_EPS = 1e-6


@dataclass
class Item:
    """One image of a gallery. ``scores`` (C,) are NaN for an image that could not be read; ``truth`` is None for a
    test image; ``f1`` and ``loss`` are its own (validation images only)."""
    image_id: str
    caption: str | None
    scores: np.ndarray
    predicted: list
    truth: list | None = None
    f1: float | None = None
    loss: float | None = None

    @property
    def readable(self) -> bool:
        return not np.isnan(self.scores).any()

    @property
    def missed(self) -> list:
        return sorted(set(self.truth or ()) - set(self.predicted))

    @property
    def extra(self) -> list:
        return sorted(set(self.predicted) - set(self.truth)) if self.truth is not None else []

    def top(self, k: int = TOP_SCORES) -> list:
        """``(label index, score)`` of the ``k`` highest scores, highest first (none for an unreadable image)."""
        if not self.readable:
            return []
        order = np.argsort(-self.scores, kind="stable")[:k]
        return [(int(c), float(self.scores[c])) for c in order]

    @property
    def top_score(self) -> float:
        return float(np.max(self.scores)) if self.readable else -1.0


def per_image_loss(truth: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Each image's binary cross-entropy, averaged over the labels (the training loss, per row)."""
    p = np.clip(probs.astype(np.float64), LOSS_EPS, 1 - LOSS_EPS)
    t = truth.astype(np.float64)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean(axis=1)


def threshold_texts(choice: ThresholdChoice, n_labels: int) -> list:
    """Each label's decision rule, as the per-class table shows it."""
    if choice.strategy == "per_class":
        return [f"{float(v):.3f}" if float(v) <= 1.0 else "never" for v in choice.value]
    if choice.strategy == "percentile":
        return [f"top {100 - float(choice.value):g}% of each image's scores"] * n_labels
    if choice.strategy == "global_top1":
        return [f"{float(choice.value):.2f} (or the image's top score)"] * n_labels
    return [f"{float(choice.value):.2f}"] * n_labels


def per_class_rows(labels: list, truth: np.ndarray, probs: np.ndarray, pred: np.ndarray,
                   choice: ThresholdChoice) -> list:
    """One dict per label: F1, precision, recall, AP (NaN without a positive), support, predicted, threshold."""
    m = prf(truth, pred)
    _, ap = mean_average_precision(truth, probs)
    rules = threshold_texts(choice, len(labels))
    return [{"label": lab, "f1": m["f1_per_class"][c], "precision": m["precision_per_class"][c],
             "recall": m["recall_per_class"][c], "ap": float(ap[c]), "support": m["support_per_class"][c],
             "predicted": int(pred[:, c].sum()), "threshold": rules[c]} for c, lab in enumerate(labels)]


def worst_errors(ids: list, captions: list, truth: np.ndarray, probs: np.ndarray, pred: np.ndarray) -> list:
    """The images whose predicted label set is not their true one, worst first: by their own F1 (lowest first),
    then by their loss (highest first), then by ImageID, so the order is the same on every machine."""
    f1 = f1_per_sample(truth, pred)
    loss = per_image_loss(truth, probs)
    wrong = np.flatnonzero((truth != pred).any(axis=1))
    names = np.array([str(ids[i]) for i in wrong], dtype=object)
    order = wrong[np.lexsort((names, -loss[wrong], f1[wrong]))]
    return [Item(str(ids[i]), captions[i], probs[i], np.flatnonzero(pred[i]).tolist(),
                 np.flatnonzero(truth[i]).tolist(), float(f1[i]), float(loss[i])) for i in order]


def co_occurrence(truth: np.ndarray, pred: np.ndarray) -> dict:
    """``both[b, a]``: validation images where label b is true and label a is predicted (the diagonal: b found);
    ``wrong[b, a]``: those of them where a is not true (a predicted in error beside b); ``support[b]``."""
    t, p = truth.astype(np.int64), pred.astype(np.int64)
    return {"both": t.T @ p, "wrong": t.T @ (p * (1 - t)), "support": t.sum(axis=0)}


def top_confusions(co: dict, k: int = 10) -> list:
    """The ``k`` largest ``(b, a, wrong count, support of b)`` of :func:`co_occurrence`: label a predicted in
    error when b is true, most often first (ties: by label order)."""
    wrong = co["wrong"].copy()
    np.fill_diagonal(wrong, 0)
    pairs = [(int(b), int(a)) for b, a in zip(*np.nonzero(wrong))]
    pairs.sort(key=lambda ba: (-int(wrong[ba]), ba))
    return [(b, a, int(wrong[b, a]), int(co["support"][b])) for b, a in pairs[:k]]


def test_sample(ids: list, captions: list, probs: np.ndarray, predicted: list, k: int) -> list:
    """``k`` test rows spread evenly over the table (its first and last among them), as :class:`Item`;
    ``predicted`` holds each row's predicted label indices as predictions.csv has them."""
    n = len(ids)
    rows = np.unique(np.linspace(0, n - 1, num=min(k, n)).round().astype(int)) if n and k > 0 else []
    return [Item(str(ids[i]), captions[i], probs[i], list(predicted[i])) for i in rows]
