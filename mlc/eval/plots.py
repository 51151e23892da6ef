"""PNG plots of a run: training curves, per-class scores, threshold search, PR curves.

Every function returns PNG bytes and writes nothing: the caller decides where
they go (local disk, a bucket via :mod:`mlc.io.storage`, a Ray artifact).

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas
directly instead of ``pyplot``: that needs no display, never switches the
process-wide backend under other code, and leaves no figure registered in
pyplot's global manager, so rendering in a loop over epochs cannot leak memory.

Inputs are treated as possibly incomplete (an epoch without validation, a
class without positives giving a ``nan`` AP, an empty history): a plot with a
gap or a "no data" note is more useful than an exception at the end of a run.
"""

from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mlc.eval import metrics, thresholds

__all__ = ["history_png", "per_class_f1_png", "threshold_png", "pr_curves_png"]

# 100 dpi: the figure sizes below (inches) then give 1000-1400 px wide images,
# readable in a report or notebook without being heavy.
_DPI = 100

_LOSS_KEYS = ("train_loss", "val_loss")
_SCORE_KEYS = ("f1_samples", "f1_micro", "f1_macro", "map")


def _render(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)  # attaches itself to fig
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    fig.clear()  # drop artists now rather than waiting for the garbage collector
    return buf.getvalue()


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def _lookup(row: Mapping, key: str):
    # The trainer may log validation scores bare ("f1_samples") or prefixed
    # ("val_f1_samples"); accept either so the plot never silently goes empty.
    if key in row:
        return row[key]
    return row.get(f"val_{key}")


def history_png(history: Sequence[Mapping]) -> bytes:
    """Per-epoch losses (left) and validation scores (right).

    Each row has ``epoch`` (the row's position is used if missing) and any of
    ``train_loss``, ``val_loss``, ``f1_samples``, ``f1_micro``, ``f1_macro``,
    ``map``. Missing, ``None`` or ``nan`` values are skipped; a series with no
    value at all is not drawn.
    """
    fig = Figure(figsize=(12, 4.5))
    ax_loss, ax_score = fig.subplots(1, 2)

    def series(key):
        xs, ys = [], []
        for i, row in enumerate(history):
            v = _lookup(row, key)
            if _finite(v):
                xs.append(row.get("epoch", i))
                ys.append(float(v))
        return xs, ys

    for ax, keys, title, ylabel in (
        (ax_loss, _LOSS_KEYS, "Loss", "loss"),
        (ax_score, _SCORE_KEYS, "Validation scores", "score"),
    ):
        drawn = 0
        for key in keys:
            xs, ys = series(key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
                drawn += 1
        if drawn:
            ax.legend(loc="best", fontsize="small")
        else:
            _no_data(ax)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_score.set_ylim(0, 1)  # scores are in [0, 1]; a fixed scale makes runs comparable
    losses = [y for key in _LOSS_KEYS for y in series(key)[1]]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 20:
        # An early spike (BatchNorm statistics of a network trained from scratch) would flatten the rest.
        ax_loss.set_yscale("log")
    fig.tight_layout()
    return _render(fig)


def per_class_f1_png(labels: Sequence[str], f1: Sequence[float], ap: Sequence[float] | None = None) -> bytes:
    """Bar chart of F1 per class, with AP bars beside them when given.

    ``nan`` values (e.g. the AP of a class with no positive) get no bar and an
    "n/a" mark so that a missing value is not mistaken for a score of 0.
    """
    labels = [str(x) for x in labels]
    if len(f1) != len(labels) or (ap is not None and len(ap) != len(labels)):
        raise ValueError(
            f"labels, f1 and ap must have the same length, got {len(labels)}, {len(f1)}, "
            f"{None if ap is None else len(ap)}"
        )
    fig = Figure(figsize=(max(8.0, 0.6 * len(labels) + 2), 4.5))
    ax = fig.subplots()
    if not labels:
        _no_data(ax, "no classes")
        return _render(fig)

    x = np.arange(len(labels), dtype=float)
    groups = [("F1", f1)] + ([("AP", ap)] if ap is not None else [])
    width = 0.8 / len(groups)
    for g, (name, values) in enumerate(groups):
        pos = x - 0.4 + width * (g + 0.5)
        vals = [float(v) if _finite(v) else math.nan for v in values]
        ok = [i for i, v in enumerate(vals) if not math.isnan(v)]
        ax.bar(pos[ok], [vals[i] for i in ok], width=width, label=name)
        for i, v in enumerate(vals):
            if math.isnan(v):
                ax.text(pos[i], 0.01, "n/a", ha="center", va="bottom", fontsize="x-small", rotation=90)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=45 if max(len(s) for s in labels) > 3 else 0, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("class")
    ax.set_ylabel("score")
    ax.set_title("Per-class F1" + (" and average precision" if ap is not None else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return _render(fig)


def _choice_dict(choice) -> dict | None:
    if choice is None:
        return None
    if isinstance(choice, thresholds.ThresholdChoice):
        return choice.to_dict()
    return dict(choice)


def threshold_png(curves: Mapping, choice=None) -> bytes:
    """Samples F1 against the per-image percentile (left) and the global threshold (right).

    ``curves`` is the second value returned by
    :func:`mlc.eval.thresholds.select_threshold`; the cross-fitted per-class F1 is
    drawn on both panels as a horizontal line for comparison. ``choice`` (a
    :class:`~mlc.eval.thresholds.ThresholdChoice` or its dict) marks the selected point,
    or labels the line when per-class thresholds won.
    """
    ch = _choice_dict(choice)
    per_class = (curves.get("per_class") or {}).get("f1_samples")
    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    for ax, key, xlabel, title in (
        (axes[0], "percentile", "percentile P (keep scores >= P-th percentile of the image)", "F1 vs per-image percentile"),
        (axes[1], "global", "threshold t (keep scores >= t)", "F1 vs global threshold"),
    ):
        c = curves.get(key) or {}
        xs, ys = list(c.get("values") or []), list(c.get("f1_samples") or [])
        drawn = False
        if xs and len(xs) == len(ys):
            ax.plot(xs, ys, label=f"{key} (samples F1)")
            drawn = True
        top1 = (curves.get("global_top1") or {}) if key == "global" else {}
        if top1.get("values") and len(top1["values"]) == len(top1.get("f1_samples") or []):
            ax.plot(top1["values"], top1["f1_samples"], label="global, top label always kept (samples F1)")
            drawn = True
        if ch and ch.get("strategy") == "global_top1" and key == "global":
            ch = dict(ch, strategy="global")  # marked on the global panel
        if _finite(per_class):
            chosen = bool(ch and ch.get("strategy") == "per_class")
            ax.axhline(
                float(per_class),
                color="tab:red",
                linestyle="--",
                label="per-class thresholds (cross-fitted)" + (" [chosen]" if chosen else ""),
            )
            drawn = True
        if ch and ch.get("strategy") == key and _finite(ch.get("value")):
            y = ch.get("f1")
            if not _finite(y) and xs:
                y = ys[int(np.argmin(np.abs(np.asarray(xs) - float(ch["value"]))))]
            if _finite(y):
                ax.plot([float(ch["value"])], [float(y)], marker="*", markersize=14, color="black", linestyle="none",
                        label=f"chosen: {float(ch['value']):g} (F1 {float(y):.4f})")
        if drawn:
            ax.legend(loc="best", fontsize="small")
        else:
            _no_data(ax)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("samples F1")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _render(fig)


def pr_curves_png(y_true, probs, labels: Sequence[str]) -> bytes:
    """Precision-recall curve of every class with a positive, on one axes.

    The curves are step functions (precision P_n held over recall
    (R_{n-1}, R_n]) whose areas are exactly the APs in the legend, starting
    from (recall 0, precision 1) as scikit-learn's do. Classes without a
    positive have no curve (their AP is undefined) and are listed in the title.
    """
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=float)
    if y.ndim != 2 or y.shape != p.shape or len(labels) != y.shape[1]:
        raise ValueError(
            f"y_true {y.shape} and probs {p.shape} must be equal (N, C) arrays with C = len(labels) = {len(labels)}"
        )
    fig = Figure(figsize=(11, 7))
    ax = fig.subplots()
    # tab20: 20 distinct colours, enough for the 18 classes without repeats.
    cmap = matplotlib.colormaps["tab20"]
    skipped = []
    drawn = 0
    for c, label in enumerate(labels):
        col = y[:, c].astype(bool)
        if y.shape[0] == 0 or not col.any():
            skipped.append(str(label))
            continue
        prec, rec, _ = metrics.pr_curve(col, p[:, c])
        ap = metrics.average_precision(col, p[:, c])
        ax.plot(np.r_[0.0, rec], np.r_[1.0, prec], drawstyle="steps-pre", color=cmap(c % 20),
                label=f"{label} (AP {ap:.3f})")
        drawn += 1
    title = "Precision-recall per class"
    if skipped:
        title += f" (no positives, not drawn: {', '.join(skipped)})"
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    else:
        _no_data(ax, "no class has a positive")
    fig.tight_layout()
    return _render(fig)


def sweep_png(table) -> bytes:
    """Validation F1 of each trial against its learning rate (log scale), one colour per unfrozen depth.

    ``table`` is the sweep's results table (columns lr, unfrozen_depth, best_f1_samples, status);
    hollow markers are trials ASHA stopped early, crosses trials that failed before an epoch ended.
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    rows = [r for r in table.to_dict("records")]
    if not rows:
        _no_data(ax)
        return _render(fig)
    cmap = matplotlib.colormaps["viridis"]
    for depth in range(5):
        mine = [r for r in rows if int(r["unfrozen_depth"]) == depth]
        if not mine:
            continue
        colour = cmap(depth / 4)
        done = [r for r in mine if _finite(r["best_f1_samples"]) and r["status"] == "completed"]
        early = [r for r in mine if _finite(r["best_f1_samples"]) and r["status"] != "completed"]
        failed = [r for r in mine if not _finite(r["best_f1_samples"])]
        if done:
            ax.scatter([r["lr"] for r in done], [r["best_f1_samples"] for r in done], color=colour, s=50,
                       label=f"depth {depth}")
        if early:
            ax.scatter([r["lr"] for r in early], [r["best_f1_samples"] for r in early], facecolors="none",
                       edgecolors=[colour], s=50, label=f"depth {depth} (stopped early)")
        if failed:
            ax.scatter([r["lr"] for r in failed], [0.0] * len(failed), marker="x", color=colour,
                       label=f"depth {depth} (failed)")
    best = max((r for r in rows if _finite(r["best_f1_samples"])), key=lambda r: r["best_f1_samples"], default=None)
    if best is not None:
        ax.annotate("best", (best["lr"], best["best_f1_samples"]), textcoords="offset points", xytext=(6, 6))
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("best validation F1 (samples)")
    ax.set_title("sweep: validation F1 by learning rate and unfrozen depth")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _render(fig)
