"""mlc.eval.metrics and mlc.eval.thresholds against scikit-learn, hand-computed edge cases and constructed data."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from mlc.eval import metrics as M
from mlc.eval import thresholds as T

sk = pytest.importorskip("sklearn.metrics")

TOL = 1e-6


def _sk_prf(yt, yp, zd=M.ZERO_DIVISION):
    """All prf() keys computed by scikit-learn: the macro averages over the labels with a positive in ``yt``
    (``labels=``), NaN when there is none."""
    out = {}
    present = [int(c) for c in np.flatnonzero(np.asarray(yt).sum(axis=0) > 0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for avg in ("micro", "macro", "samples"):
            kw = dict(average=avg, zero_division=zd)
            if avg == "macro" and not present:
                for k in ("precision", "recall", "f1"):
                    out[f"{k}_macro"] = math.nan
                continue
            if avg == "macro":
                kw["labels"] = present
            out[f"precision_{avg}"] = sk.precision_score(yt, yp, **kw)
            out[f"recall_{avg}"] = sk.recall_score(yt, yp, **kw)
            out[f"f1_{avg}"] = sk.f1_score(yt, yp, **kw)
        kw = dict(average=None, zero_division=zd)
        out["precision_per_class"] = sk.precision_score(yt, yp, **kw)
        out["recall_per_class"] = sk.recall_score(yt, yp, **kw)
        out["f1_per_class"] = sk.f1_score(yt, yp, **kw)
        out["support_per_class"] = sk.precision_recall_fscore_support(yt, yp, average=None, zero_division=zd)[3]
    return out


def _assert_prf_equal(ours, ref):
    for k, v in ref.items():
        np.testing.assert_allclose(ours[k], v, atol=TOL, rtol=0, err_msg=k)


def _random_case(rng):
    n = int(rng.choice([1, 2, 3, 7, 25, 60]))
    c = int(rng.choice([2, 3, 5, 18]))
    density = float(rng.choice([0.03, 0.15, 0.5, 0.9]))
    yt = (rng.random((n, c)) < density).astype(int)
    yp = (rng.random((n, c)) < density).astype(int)
    # Sparse corners: empty rows and columns in truth and/or prediction.
    if rng.random() < 0.5:
        yt[rng.integers(0, n)] = 0
    if rng.random() < 0.5:
        yp[rng.integers(0, n)] = 0
    if rng.random() < 0.5:
        yt[:, rng.integers(0, c)] = 0
    if rng.random() < 0.5:
        yp[:, rng.integers(0, c)] = 0
    return yt, yp


# --------------------------------------------------------------------------
# prf


def test_prf_matches_sklearn_on_random_cases():
    rng = np.random.default_rng(1234)
    for _ in range(120):
        yt, yp = _random_case(rng)
        _assert_prf_equal(M.prf(yt, yp), _sk_prf(yt, yp))


def test_prf_matches_sklearn_with_zero_division_zero_and_bool_input():
    rng = np.random.default_rng(99)
    for _ in range(30):
        yt, yp = _random_case(rng)
        _assert_prf_equal(M.prf(yt.astype(bool), yp.astype(bool), zero_division=0.0), _sk_prf(yt, yp, 0.0))


def test_the_rule_for_empty_label_sets_is_sklearns_zero_division_one():
    """The one rule mlc scores with: an image with no true and no predicted label scores 1, checked against
    scikit-learn with an explicit zero_division=1, on tables where many rows are empty on either side."""
    assert M.ZERO_DIVISION == 1.0
    rng = np.random.default_rng(7)
    for _ in range(60):
        yt, yp = _random_case(rng)
        yt[rng.random(len(yt)) < 0.3] = 0   # images of none of the labels
        yp[rng.random(len(yp)) < 0.3] = 0   # images predicted with none
        ours = M.prf(yt, yp)
        _assert_prf_equal(ours, _sk_prf(yt, yp, 1.0))
        assert ours["f1_samples"] == pytest.approx(sk.f1_score(yt, yp, average="samples", zero_division=1))
        assert M.samples_f1(yt, yp) == pytest.approx(ours["f1_samples"])


def test_prf_image_without_prediction():
    yt = [[1, 0, 0], [0, 1, 0]]
    yp = [[1, 0, 0], [0, 0, 0]]
    r = M.prf(yt, yp)
    # row 2: P = 0/0 -> 1 (nothing predicted wrongly), R = 0, F1 = 0
    assert r["precision_samples"] == pytest.approx(1.0)
    assert r["recall_samples"] == pytest.approx(0.5)
    assert r["f1_samples"] == pytest.approx(0.5)
    # micro: tp 1, predicted 1, true 2
    assert r["precision_micro"] == pytest.approx(1.0)
    assert r["recall_micro"] == pytest.approx(0.5)
    assert r["f1_micro"] == pytest.approx(2 / 3)
    # macro over the 2 classes with a positive; class 2 is absent from the truth and left out
    assert r["f1_per_class"] == pytest.approx([1.0, 0.0, 1.0])
    assert r["labels_without_positives"] == [2]
    assert r["f1_macro"] == pytest.approx(1 / 2)
    assert r["precision_macro"] == pytest.approx(1.0)  # class 1: nothing predicted, 0/0 -> 1
    assert r["support_per_class"] == [1, 1, 0]
    _assert_prf_equal(r, _sk_prf(np.array(yt), np.array(yp)))


def test_prf_image_without_true_label():
    yt = [[0, 0], [1, 0]]
    yp = [[1, 0], [1, 0]]
    r = M.prf(yt, yp)
    # row 1: tp 0, predicted 1, true 0 -> P 0, R 0/0 -> 1, F1 0
    assert r["f1_samples"] == pytest.approx(0.5)
    assert r["recall_samples"] == pytest.approx(1.0)
    assert r["precision_samples"] == pytest.approx(0.5)
    _assert_prf_equal(r, _sk_prf(np.array(yt), np.array(yp)))


def test_prf_image_with_neither_true_nor_predicted_scores_one():
    yt = [[0, 0], [1, 0]]
    yp = [[0, 0], [1, 0]]
    assert M.prf(yt, yp)["f1_samples"] == pytest.approx(1.0)
    assert M.prf(yt, yp, zero_division=0.0)["f1_samples"] == pytest.approx(0.5)


def test_prf_every_row_empty_leaves_macro_undefined():
    yt = np.zeros((3, 2), dtype=int)
    yp = np.array([[0, 0], [0, 1], [0, 0]])
    r = M.prf(yt, yp)
    assert r["f1_samples"] == pytest.approx(2 / 3)  # the false positive costs its image
    assert r["f1_micro"] == pytest.approx(0.0)      # 0 tp over 1 prediction
    assert math.isnan(r["f1_macro"]) and r["labels_without_positives"] == [0, 1]


def test_prf_class_absent_from_truth_but_predicted():
    yt = [[1, 0], [1, 0]]
    yp = [[1, 1], [1, 0]]
    r = M.prf(yt, yp)
    assert r["precision_per_class"] == pytest.approx([1.0, 0.0])
    assert r["recall_per_class"] == pytest.approx([1.0, 1.0])  # 0/0 -> 1
    assert r["f1_per_class"] == pytest.approx([1.0, 0.0])
    assert r["f1_macro"] == pytest.approx(1.0)  # class 1 has no positive: left out of macro...
    assert r["f1_micro"] == pytest.approx(2 * 2 / (2 * 2 + 1))  # ...its false positive still counts here
    assert r["f1_samples"] == pytest.approx((2 / 3 + 1) / 2)
    assert r["support_per_class"] == [2, 0]
    _assert_prf_equal(r, _sk_prf(np.array(yt), np.array(yp)))


def test_prf_single_image():
    yt = [[1, 1, 0]]
    yp = [[1, 0, 1]]
    r = M.prf(yt, yp)
    for k in ("precision", "recall", "f1"):
        assert r[f"{k}_samples"] == pytest.approx(0.5)
        assert r[f"{k}_micro"] == pytest.approx(0.5)
    assert r["f1_macro"] == pytest.approx(1 / 2)  # classes 0 (F1 1) and 1 (F1 0); class 2 has no positive
    _assert_prf_equal(r, _sk_prf(np.array(yt), np.array(yp)))


def test_prf_output_is_json_serialisable_with_plain_types():
    r = M.prf([[1, 0], [0, 1]], [[1, 1], [0, 0]])
    json.dumps(r)
    assert all(isinstance(v, int) for v in r["support_per_class"])
    assert isinstance(r["f1_samples"], float)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 2\)"):
        M.prf(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        M.prf(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="0/1"):
        M.prf([[2, 0]], [[1, 0]])
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
        M.mean_average_precision(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        T.apply_threshold([[np.nan, 0.1]], "global", 0.5)


# --------------------------------------------------------------------------
# average precision


def _sk_ap(y, s):
    return float(sk.average_precision_score(y, s))


def test_average_precision_matches_sklearn_with_ties():
    rng = np.random.default_rng(7)
    for _ in range(150):
        n = int(rng.integers(1, 60))
        y = (rng.random(n) < rng.choice([0.05, 0.3, 0.8])).astype(int)
        if not y.any():
            y[rng.integers(0, n)] = 1
        # rounding to 1 decimal creates many tied scores
        s = np.round(rng.random(n), int(rng.choice([1, 2, 6])))
        assert M.average_precision(y, s) == pytest.approx(_sk_ap(y, s), abs=TOL)


def test_average_precision_explicit_values():
    # tie group at 0.5: thresholds 0.9 (R .5, P 1) and 0.5 (R 1, P .5)
    assert M.average_precision([1, 0, 0, 1], [0.9, 0.5, 0.5, 0.5]) == pytest.approx(0.75)
    # one tie group for everything: AP = prevalence
    assert M.average_precision([1, 0, 1, 0], [0.3] * 4) == pytest.approx(0.5)
    assert M.average_precision([1, 1, 0], [0.9, 0.8, 0.1]) == pytest.approx(1.0)


def test_average_precision_without_positive_is_nan():
    assert math.isnan(M.average_precision([0, 0, 0], [0.1, 0.5, 0.9]))


def test_mean_average_precision_over_present_classes():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n, c = 40, 6
        y = (rng.random((n, c)) < 0.2).astype(int)
        y[:, 2] = 0  # an absent class
        p = np.round(rng.random((n, c)), 2)
        mean, per = M.mean_average_precision(y, p)
        present = [j for j in range(c) if y[:, j].any()]
        assert math.isnan(per[2])
        for j in present:
            assert per[j] == pytest.approx(_sk_ap(y[:, j], p[:, j]), abs=TOL)
        assert mean == pytest.approx(np.mean([_sk_ap(y[:, j], p[:, j]) for j in present]), abs=TOL)
    mean, per = M.mean_average_precision(np.zeros((3, 2)), np.full((3, 2), 0.5))
    assert math.isnan(mean) and all(math.isnan(a) for a in per)


def test_pr_curve_points():
    prec, rec, thr = M.pr_curve([1, 0, 0, 1], [0.9, 0.5, 0.5, 0.5])
    assert thr.tolist() == [0.9, 0.5]
    assert prec.tolist() == pytest.approx([1.0, 0.5])
    assert rec.tolist() == pytest.approx([0.5, 1.0])


# --------------------------------------------------------------------------
# apply_threshold


def test_percentile_90_keeps_top_two_of_20_and_of_18():
    rng = np.random.default_rng(0)
    for c in (20, 18):
        row = rng.permutation(np.linspace(0.01, 0.99, c))
        kept = T.apply_threshold(row[None, :], "percentile", 90)[0]
        assert kept.sum() == 2
        assert set(np.flatnonzero(kept)) == set(np.argsort(row)[-2:])


def test_percentile_all_equal_keeps_everything_and_ties_at_cut_are_kept():
    assert T.apply_threshold(np.full((2, 18), 0.3), "percentile", 90).all()
    row = np.array([[0.1, 0.2, 0.7, 0.7, 0.7]])
    # cut at the 90th percentile is 0.7 (both neighbours are 0.7): all three kept
    assert T.apply_threshold(row, "percentile", 90)[0].tolist() == [False, False, True, True, True]
    assert T.apply_threshold(row, "percentile", 0).all()
    assert T.apply_threshold(row, "percentile", 100).sum() == 3


def test_percentile_matches_numpy_definition():
    rng = np.random.default_rng(5)
    p = np.round(rng.random((50, 18)), 1)
    for q in (0, 12.5, 50, 88, 90, 99.5, 100):
        expected = p >= np.percentile(p, q, axis=1)[:, None]
        np.testing.assert_array_equal(T.apply_threshold(p, "percentile", q), expected)
    with pytest.raises(ValueError, match="percentile"):
        T.apply_threshold(p, "percentile", 101)


def test_global_and_per_class_thresholds():
    p = np.array([[0.2, 0.5, 0.9], [0.6, 0.4, 0.1]])
    assert T.apply_threshold(p, "global", 0.5).tolist() == [[False, True, True], [True, False, False]]
    got = T.apply_threshold(p, "per_class", [0.1, 0.45, 0.95])
    assert got.tolist() == [[True, True, False], [True, False, False]]
    with pytest.raises(ValueError, match=r"\(3,\)"):
        T.apply_threshold(p, "per_class", [0.5, 0.5])
    with pytest.raises(ValueError, match="unknown"):
        T.apply_threshold(p, "top_k", 2)


# --------------------------------------------------------------------------
# per-class tuning


def _brute_force_cut(y, s):
    """Best score value v for 'predict s >= v' by class F1; ties -> highest v."""
    best_v, best_f1 = None, -1.0
    for v in sorted(set(s.tolist()), reverse=True):
        pred = s >= v
        tp = int((pred & y).sum())
        f1 = 2 * tp / (y.sum() + pred.sum())
        if f1 > best_f1 + 1e-12:
            best_v, best_f1 = v, f1
    return best_v, best_f1


def test_tune_per_class_matches_brute_force():
    rng = np.random.default_rng(11)
    for _ in range(40):
        n, c = int(rng.integers(2, 40)), 4
        y = rng.random((n, c)) < 0.3
        y[0, :] = True  # every class has a positive
        p = np.round(np.clip(y * 0.2 + rng.random((n, c)) * 0.8, 0, 1), int(rng.choice([1, 3])))
        t = T.tune_per_class_thresholds(y, p)
        for j in range(c):
            v, f1 = _brute_force_cut(y[:, j], p[:, j])
            pred = p[:, j] >= t[j]
            np.testing.assert_array_equal(pred, p[:, j] >= v)
            lower = p[:, j][p[:, j] < v]
            # the returned threshold sits between v and the next lower score
            assert t[j] <= v
            if lower.size:
                assert t[j] > lower.max()
                assert t[j] == pytest.approx((v + lower.max()) / 2)


def test_tune_per_class_class_without_positive_is_never_predicted():
    y = np.array([[1, 0], [0, 0], [1, 0]])
    p = np.array([[0.9, 1.0], [0.2, 0.5], [0.8, 0.0]])
    t = T.tune_per_class_thresholds(y, p)
    assert t[1] > 1.0 and math.isfinite(t[1])
    assert not T.apply_threshold(p, "per_class", t)[:, 1].any()
    assert t[0] == pytest.approx((0.8 + 0.2) / 2)


def test_tune_per_class_runs_on_30000_rows():
    rng = np.random.default_rng(0)
    y = rng.random((30_000, 18)) < 0.1
    p = rng.random((30_000, 18))
    t = T.tune_per_class_thresholds(y, p)
    assert len(t) == 18 and all(math.isfinite(x) for x in t)


# --------------------------------------------------------------------------
# select_threshold on data with a known answer


def _labels_with_varying_counts(rng, n, c, density=0.2):
    y = rng.random((n, c)) < density
    y[np.arange(n), rng.integers(0, c, n)] = True  # every image has >= 1 label
    return y


def test_select_prefers_global_when_half_is_perfect():
    rng = np.random.default_rng(21)
    n, c = 300, 18
    y = _labels_with_varying_counts(rng, n, c)
    p = np.where(y, rng.uniform(0.55, 1.0, (n, c)), rng.uniform(0.0, 0.45, (n, c)))
    choice, curves = T.select_threshold(y, p)
    # per_class is also perfect here; the tie goes to the simpler global rule
    assert max(curves["percentile"]["f1_samples"]) < 1.0
    assert choice.strategy == "global"
    assert 0.45 < choice.value <= 0.55
    assert choice.f1 == pytest.approx(1.0)
    np.testing.assert_array_equal(choice.apply(p), y)


def test_select_prefers_percentile_when_every_image_has_two_labels():
    rng = np.random.default_rng(22)
    n, c = 300, 18
    y = np.zeros((n, c), dtype=bool)
    for i in range(n):
        y[i, rng.choice(c, 2, replace=False)] = True
    base = rng.uniform(0.0, 0.7, (n, 1))  # per-image score level defeats any fixed cut
    p = np.where(y, base + rng.uniform(0.2, 0.3, (n, c)), base + rng.uniform(0.0, 0.1, (n, c)))
    choice, curves = T.select_threshold(y, p)
    assert choice.strategy == "percentile"
    # rank P/100 * 17 in (15, 16] cuts between the 3rd and 2nd highest: top 2 kept
    assert 100 * 15 / 17 < choice.value <= 100 * 16 / 17
    assert choice.f1 == pytest.approx(1.0)
    assert max(curves["global"]["f1_samples"]) < 0.99
    np.testing.assert_array_equal(choice.apply(p), y)


def test_select_prefers_per_class_when_classes_need_different_cuts():
    rng = np.random.default_rng(23)
    n, c = 400, 18
    y = _labels_with_varying_counts(rng, n, c)
    level = np.linspace(0.12, 0.88, c)[None, :]
    p = np.where(y, level + rng.uniform(0.02, 0.1, (n, c)), level - rng.uniform(0.02, 0.1, (n, c)))
    choice, curves = T.select_threshold(y, p)
    assert choice.strategy == "per_class"
    assert len(choice.value) == c
    assert choice.f1 == pytest.approx(1.0)
    assert curves["per_class"]["f1_samples"] == pytest.approx(1.0)
    assert max(curves["global"]["f1_samples"]) < 0.9
    assert max(curves["percentile"]["f1_samples"]) < 0.9
    np.testing.assert_array_equal(choice.apply(p), y)


def test_cross_fitting_stops_per_class_winning_on_noise():
    n_seeds, per_class_wins, in_sample_would_win = 12, 0, 0
    for seed in range(n_seeds):
        rng = np.random.default_rng(1000 + seed)
        y = _labels_with_varying_counts(rng, 300, 18)
        p = rng.random((300, 18))
        choice, curves = T.select_threshold(y, p)
        simple = max(max(curves["percentile"]["f1_samples"]), max(curves["global"]["f1_samples"]))
        per_class_wins += choice.strategy == "per_class"
        in_sample_would_win += curves["per_class"]["f1_samples_in_sample"] > simple
    # Judged in-sample, the 18 fitted thresholds would (wrongly) win nearly always;
    # cross-fitted, per_class wins no more often than a fair share of 3 strategies.
    assert in_sample_would_win >= n_seeds - 1
    assert per_class_wins <= n_seeds // 3


def test_select_threshold_curves_shape_and_consistency():
    rng = np.random.default_rng(4)
    y = _labels_with_varying_counts(rng, 120, 18)
    p = np.clip(y * 0.3 + rng.random((120, 18)) * 0.7, 0, 1)
    choice, curves = T.select_threshold(y, p)
    assert curves["percentile"]["values"] == list(T.PERCENTILE_GRID)
    assert curves["global"]["values"] == list(T.GLOBAL_GRID)
    assert len(curves["percentile"]["f1_samples"]) == len(T.PERCENTILE_GRID)
    assert len(curves["global"]["f1_samples"]) == len(T.GLOBAL_GRID)
    json.dumps(curves)
    if choice.strategy != "per_class":
        # the reported F1 is what the chosen rule really scores on these rows
        assert M.samples_f1(y, choice.apply(p)) == pytest.approx(choice.f1, abs=1e-12)
    best = max(
        max(curves["percentile"]["f1_samples"]),
        max(curves["global"]["f1_samples"]),
        max(curves["global_top1"]["f1_samples"]),
        curves["per_class"]["f1_samples"],
    )
    assert choice.f1 == pytest.approx(best)


def test_threshold_choice_round_trip():
    for ch in (
        T.ThresholdChoice("percentile", 90.0, 0.7),
        T.ThresholdChoice("global", 0.35, 0.6),
        T.ThresholdChoice("per_class", [0.1, 1.0000000000000002], 0.5),
    ):
        d = json.loads(json.dumps(ch.to_dict()))
        back = T.ThresholdChoice.from_dict(d)
        assert back == ch
    p = np.array([[0.2, 0.9], [0.6, 0.1]])
    assert T.ThresholdChoice("global", 0.5).apply(p).tolist() == [[False, True], [True, False]]
    with pytest.raises(ValueError):
        T.ThresholdChoice("nope", 1.0)


# --------------------------------------------------------------------------
# evaluate / baseline


def test_evaluate_keys_and_json():
    rng = np.random.default_rng(8)
    y = _labels_with_varying_counts(rng, 80, 5)
    y[:, 3] = False  # absent class -> nan AP
    p = np.clip(y * 0.4 + rng.random((80, 5)) * 0.6, 0, 1)
    res = T.evaluate(y, p)
    for k in ("f1_samples", "f1_micro", "f1_macro", "precision_per_class", "support_per_class", "map", "ap_per_class"):
        assert k in res
    assert math.isnan(res["ap_per_class"][3])
    assert res["threshold"]["strategy"] in T.STRATEGIES
    json.loads(json.dumps(res))  # nan is allowed by the json module's default

    fixed = T.ThresholdChoice("global", 0.5)
    res2 = T.evaluate(y, p, fixed)
    assert res2["threshold"]["value"] == 0.5
    assert res2["f1_samples"] == pytest.approx(M.prf(y, p >= 0.5)["f1_samples"])


def test_baseline_f1():
    idx = {"a": 0, "b": 1, "c": 2}
    train = [frozenset("a"), frozenset("ab"), frozenset("ab"), frozenset("c")]
    y_val = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]])
    # predict {a, b}: F1 per image 1, 2/3, 0
    assert M.baseline_f1(train, y_val, idx) == pytest.approx((1 + 2 / 3 + 0) / 3)
    # a tie goes to the set seen first
    assert M.baseline_f1([frozenset("c"), frozenset("a")], y_val, idx) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="label_index"):
        M.baseline_f1([frozenset("z")], y_val, idx)
    with pytest.raises(ValueError, match="empty"):
        M.baseline_f1([], y_val, idx)


def test_global_top1_keeps_each_images_best_label_and_wins_where_a_plain_threshold_empties_a_row():
    p = np.array([[0.9, 0.6], [0.3, 0.1], [0.8, 0.7]])
    y = np.array([[1, 0], [1, 0], [1, 1]])
    assert T.apply_threshold(p, "global_top1", 0.65).tolist() == [[True, False], [True, False], [True, True]]
    assert T.apply_threshold(p, "global", 0.65).tolist() == [[True, False], [False, False], [True, True]]
    # Ties at the top are all kept, as the percentile rule keeps ties at its cut.
    assert T.apply_threshold([[0.2, 0.2, 0.1]], "global_top1", 0.5).tolist() == [[True, True, False]]
    choice, curves = T.select_threshold(y, p)
    # Percentile keeps a fixed share per image (best 0.889 here), a plain global threshold empties row 2.
    assert max(curves["global"]["f1_samples"]) < 1.0 and max(curves["percentile"]["f1_samples"]) < 1.0
    assert choice.strategy == "global_top1" and 0.6 <= choice.value < 0.7 and choice.f1 == pytest.approx(1.0)
    assert T.ThresholdChoice.from_dict(choice.to_dict()).apply(p).tolist() == y.astype(bool).tolist()


def test_select_predicts_nothing_for_images_of_none_of_the_labels():
    """A validation split where a fifth of the images show none of the labels (the model scores them low):
    a rule that can answer "nothing" wins, and answers it exactly for those images; the rules that force a
    label (percentile, global_top1) stay candidates but lose on the score, one point per such image."""
    rng = np.random.default_rng(31)
    n, c = 300, 18
    y = _labels_with_varying_counts(rng, n, c)
    y[rng.random(n) < 0.2] = False
    none = ~y.any(axis=1)
    assert 40 < none.sum() < 90
    p = np.where(y, rng.uniform(0.55, 1.0, (n, c)), rng.uniform(0.0, 0.45, (n, c)))
    choice, curves = T.select_threshold(y, p)
    assert choice.strategy == "global" and choice.f1 == pytest.approx(1.0)
    predicted = choice.apply(p)
    assert not predicted[none].any() and (predicted == y).all()
    # Forcing a label costs every empty image its whole F1 of 1.
    forced_best = 1.0 - none.mean()
    assert max(curves["global_top1"]["f1_samples"]) == pytest.approx(forced_best)
    assert max(curves["percentile"]["f1_samples"]) <= forced_best + 1e-12
    # Per-class thresholds, the other rule that may predict nothing, get the empty images right too.
    per_class = T.apply_threshold(p, "per_class", T.tune_per_class_thresholds(y, p))
    assert not per_class[none].any()
    assert M.prf(y, predicted)["f1_samples"] == pytest.approx(1.0)
