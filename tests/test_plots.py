"""mlc.eval.plots: every function renders a real PNG, including from incomplete inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib._pylab_helpers import Gcf

from mlc.eval import plots, thresholds

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LABELS = [str(i) for i in range(1, 19)]


def _assert_png(data: bytes) -> None:
    assert isinstance(data, bytes)
    assert data.startswith(PNG_SIGNATURE)
    # A blank canvas of these sizes is a few kB; real plots are well above that
    # and far below anything a report would choke on.
    assert 5_000 < len(data) < 2_000_000


@pytest.fixture(scope="module")
def scored():
    rng = np.random.default_rng(0)
    y = rng.random((200, 18)) < 0.15
    y[np.arange(200), rng.integers(0, 18, 200)] = True
    y[:, 5] = False  # a class without positives
    p = np.clip(y * 0.35 + rng.random((200, 18)) * 0.65, 0, 1)
    return y, p


def test_history_png_full_and_partial_rows():
    history = [
        {"epoch": 1, "train_loss": 0.5, "val_loss": 0.45, "f1_samples": 0.5, "f1_micro": 0.52, "f1_macro": 0.3, "map": 0.4},
        {"epoch": 2, "train_loss": 0.4},  # no validation this epoch
        {"epoch": 3, "train_loss": 0.3, "val_loss": float("nan"), "val_f1_samples": 0.7, "map": None},
    ]
    _assert_png(plots.history_png(history))


def test_history_png_empty_and_without_epoch():
    _assert_png(plots.history_png([]))
    _assert_png(plots.history_png([{"train_loss": 1.0}, {"train_loss": 0.8}]))


def test_per_class_f1_png_with_and_without_ap(scored):
    y, p = scored
    res = thresholds.evaluate(y, p)
    assert math.isnan(res["ap_per_class"][5])
    _assert_png(plots.per_class_f1_png(LABELS, res["f1_per_class"], res["ap_per_class"]))
    _assert_png(plots.per_class_f1_png(LABELS, res["f1_per_class"], None))
    _assert_png(plots.per_class_f1_png(["sky", "dog"], [float("nan"), 0.5], [float("nan"), float("nan")]))
    _assert_png(plots.per_class_f1_png([], [], None))
    with pytest.raises(ValueError, match="same length"):
        plots.per_class_f1_png(["a", "b"], [0.1], None)


def test_threshold_png_from_select_threshold(scored):
    y, p = scored
    choice, curves = thresholds.select_threshold(y, p)
    _assert_png(plots.threshold_png(curves, choice))
    _assert_png(plots.threshold_png(curves))
    _assert_png(plots.threshold_png(curves, choice.to_dict()))
    for strategy, value in (("percentile", 90.0), ("global", 0.5)):
        _assert_png(plots.threshold_png(curves, thresholds.ThresholdChoice(strategy, value)))  # f1 nan: read off curve
    _assert_png(plots.threshold_png(curves, thresholds.ThresholdChoice("per_class", [0.5] * 18, 0.6)))


def test_threshold_png_with_missing_parts():
    _assert_png(plots.threshold_png({}))
    _assert_png(plots.threshold_png({"percentile": {"values": [0, 50], "f1_samples": [0.2, 0.4]}}))
    _assert_png(plots.threshold_png({"per_class": {"f1_samples": float("nan")}}))


def test_pr_curves_png(scored):
    y, p = scored
    _assert_png(plots.pr_curves_png(y, p, LABELS))
    _assert_png(plots.pr_curves_png(np.zeros((4, 3)), np.full((4, 3), 0.5), ["a", "b", "c"]))
    with pytest.raises(ValueError, match="len\\(labels\\)"):
        plots.pr_curves_png(y, p, LABELS[:-1])


def test_no_figures_left_open(scored):
    y, p = scored
    before = Gcf.get_num_fig_managers()
    for _ in range(5):
        plots.history_png([{"epoch": 1, "train_loss": 1.0}])
        plots.pr_curves_png(y, p, LABELS)
    assert Gcf.get_num_fig_managers() == before == 0
