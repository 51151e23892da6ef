"""Scoring a Kaggle-format submission (``ImageID,Labels``) against a labelled table."""

from __future__ import annotations

import numpy as np

from mlc.data.labels import LabelVocab
from mlc.eval.metrics import prf
from mlc.data.table import TableError, read_table, unlabelled_rows


class SubmissionError(ValueError):
    """The submission cannot be scored: the message names the file and the offending IDs or line."""


def _first(items, n: int = 10) -> str:
    items = list(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def score_submission(predictions: str, truth: str) -> dict:
    """Samples/micro/macro F1, precision and recall plus a per-class table.

    Rows are matched by ImageID (any order). Predicted labels outside the
    truth's vocabulary count as false positives in the micro and samples
    scores; the macro averages run over the truth's classes. Either file may have empty Labels fields:
    an image with none in both scores 1 (:data:`mlc.eval.metrics.ZERO_DIVISION`).
    """
    try:
        pred = read_table(predictions, require=("ImageID", "Labels"))
        true = read_table(truth, require=("ImageID", "Labels"), labelled=True)
    except TableError as e:
        raise SubmissionError(str(e)) from e
    true_ids, pred_ids = set(true.ImageID), set(pred.ImageID)
    missing = [i for i in true.ImageID if i not in pred_ids]
    extra = [i for i in pred.ImageID if i not in true_ids]
    problems = []
    if missing:
        problems.append(f"{len(missing)} ImageID(s) of {truth} missing from {predictions}: {_first(missing)}")
    if extra:
        problems.append(f"{len(extra)} ImageID(s) in {predictions} not in {truth}: {_first(extra)}")
    if problems:
        raise SubmissionError("; ".join(problems))

    known_labels = LabelVocab.from_label_lists(true.Labels).labels if unlabelled_rows(true) < len(true) else []
    unknown = sorted({lab for labs in pred.Labels for lab in labs} - set(known_labels))
    by_id = dict(zip(pred.ImageID, pred.Labels))
    if not known_labels:  # an all-negative truth: one column that is never true gives the metrics a shape
        known_labels = [""]
    vocab = LabelVocab(known_labels)
    columns = LabelVocab(vocab.labels + unknown)  # unknown columns: never true, so every use is a false positive
    y_true = columns.encode(true.Labels).astype(bool)
    y_pred = columns.encode([by_id[i] for i in true.ImageID]).astype(bool)

    all_cols = prf(y_true, y_pred)
    known = prf(y_true[:, : len(vocab)], y_pred[:, : len(vocab)])
    result = {k: all_cols[k] for k in ("f1_samples", "precision_samples", "recall_samples",
                                        "f1_micro", "precision_micro", "recall_micro")}
    result.update({k: known[k] for k in ("f1_macro", "precision_macro", "recall_macro")})
    result["rows"] = len(true)
    result["empty_truth"] = unlabelled_rows(true)
    result["empty_predictions"] = int((~y_pred.any(axis=1)).sum())
    result["unknown_labels"] = {lab: int(y_pred[:, columns.index[lab]].sum()) for lab in unknown}
    result["per_class"] = [
        {"label": lab, "precision": known["precision_per_class"][c], "recall": known["recall_per_class"][c],
         "f1": known["f1_per_class"][c], "support": int(known["support_per_class"][c]),
         "predicted": int(y_pred[:, c].sum())}
        for c, lab in enumerate(vocab.labels) if lab]
    return result


def format_report(r: dict) -> str:
    lines = [f"{r['rows']} images scored ({r['empty_predictions']} with no predicted label, {r['empty_truth']} with "
             "no true label)", "",
             f"{'':10}{'F1':>8}{'precision':>11}{'recall':>8}"]
    for avg in ("samples", "micro", "macro"):
        lines.append(f"{avg:10}{r['f1_' + avg]:8.4f}{r['precision_' + avg]:11.4f}{r['recall_' + avg]:8.4f}")
    lines += ["", f"{'label':>8}{'F1':>8}{'precision':>11}{'recall':>8}{'support':>9}{'predicted':>11}"]
    for row in r["per_class"]:
        lines.append(f"{row['label']:>8}{row['f1']:8.4f}{row['precision']:11.4f}{row['recall']:8.4f}"
                     f"{row['support']:9d}{row['predicted']:11d}")
    if r["unknown_labels"]:
        lines.append("labels not in the truth (false positives): "
                     + ", ".join(f"{k} x{v}" for k, v in r["unknown_labels"].items()))
    return "\n".join(lines)


def json_summary(r: dict) -> dict:
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()}
