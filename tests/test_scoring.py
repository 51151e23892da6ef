"""mlc.eval.scoring.score_submission and jobs/score.py, checked against scikit-learn on the real labels."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from mlc.eval.scoring import SubmissionError, score_submission
from mlc.data.table import read_table, submission_csv

REPO = Path(__file__).resolve().parents[1]

N_ROWS = 2000
JSON_KEYS = {"f1_samples", "f1_micro", "f1_macro", "precision_samples", "recall_samples",
             "precision_micro", "recall_micro"}


@pytest.fixture(scope="module")
def truth_csv(real_data, tmp_path_factory):
    """The first 2,000 records of the real train.csv, byte for byte (quirks included: 552, 1014)."""
    text = (real_data / "train.csv").read_bytes().decode("utf-8")
    cut = text.index(f"\n{N_ROWS}.jpg,") + 1
    p = tmp_path_factory.mktemp("truth") / "truth.csv"
    p.write_text(text[:cut], encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def truth(truth_csv):
    t = read_table(str(truth_csv))
    assert len(t) == N_ROWS
    return t


def _random_predictions(truth, seed=0):
    """Per image: the true labels kept with p=0.7 plus random wrong ones; ~5% empty rows."""
    rng = np.random.default_rng(seed)
    vocab = sorted({lab for labs in truth.Labels for lab in labs}, key=int)
    preds = []
    for labs in truth.Labels:
        if rng.random() < 0.05:
            preds.append([])
            continue
        p = [lab for lab in labs if rng.random() < 0.7]
        p += [lab for lab in vocab if lab not in labs and rng.random() < 0.08]
        rng.shuffle(p)
        preds.append(p)
    return preds


def _write_submission(path, ids, preds, seed=1):
    order = np.random.default_rng(seed).permutation(len(ids))
    path.write_text(submission_csv([ids[i] for i in order], [preds[i] for i in order]), encoding="utf-8")
    return path


def _sklearn(y_true, y_pred, labels_for_macro):
    """scikit-learn's scores with mlc's one rule for empty label sets: zero_division=1 (mlc.eval.metrics)."""
    out = {}
    for avg in ("samples", "micro"):
        out[f"f1_{avg}"] = f1_score(y_true, y_pred, average=avg, zero_division=1)
        out[f"precision_{avg}"] = precision_score(y_true, y_pred, average=avg, zero_division=1)
        out[f"recall_{avg}"] = recall_score(y_true, y_pred, average=avg, zero_division=1)
    k = labels_for_macro
    out["f1_macro"] = f1_score(y_true[:, :k], y_pred[:, :k], average="macro", zero_division=1)
    out["precision_macro"] = precision_score(y_true[:, :k], y_pred[:, :k], average="macro", zero_division=1)
    out["recall_macro"] = recall_score(y_true[:, :k], y_pred[:, :k], average="macro", zero_division=1)
    return out


def _matrix(label_lists, columns):
    idx = {lab: i for i, lab in enumerate(columns)}
    m = np.zeros((len(label_lists), len(columns)), dtype=int)
    for r, labs in enumerate(label_lists):
        for lab in labs:
            m[r, idx[lab]] = 1
    return m


def test_score_matches_sklearn(truth, truth_csv, tmp_path):
    ids = list(truth.ImageID)
    preds = _random_predictions(truth)
    sub = _write_submission(tmp_path / "sub.csv", ids, preds)
    assert read_table(str(sub)).ImageID[0] != ids[0]  # really shuffled

    r = score_submission(str(sub), str(truth_csv))
    vocab = sorted({lab for labs in truth.Labels for lab in labs}, key=int)
    assert len(vocab) == 18  # the first 2,000 rows hold every class (268, 283, 397 carry 13/14)
    y_true, y_pred = _matrix(truth.Labels, vocab), _matrix(preds, vocab)
    expected = _sklearn(y_true, y_pred, len(vocab))
    for k, v in expected.items():
        assert r[k] == pytest.approx(v, abs=1e-9), k
    assert r["rows"] == N_ROWS
    assert r["empty_predictions"] == sum(not p for p in preds) > 0
    assert r["unknown_labels"] == {}
    assert [c["label"] for c in r["per_class"]] == vocab
    per_f1 = f1_score(y_true, y_pred, average=None, zero_division=1)
    assert [c["f1"] for c in r["per_class"]] == pytest.approx(per_f1.tolist(), abs=1e-9)
    assert [c["support"] for c in r["per_class"]] == y_true.sum(axis=0).tolist()
    assert [c["predicted"] for c in r["per_class"]] == y_pred.sum(axis=0).tolist()


def test_perfect_submission_scores_one(truth, truth_csv, tmp_path):
    ids = list(truth.ImageID)
    sub = _write_submission(tmp_path / "sub.csv", ids, [list(reversed(l)) for l in truth.Labels])
    r = score_submission(str(sub), str(truth_csv))
    for k in JSON_KEYS | {"precision_macro", "recall_macro"}:
        assert r[k] == pytest.approx(1.0), k


def test_unknown_labels_are_false_positives(truth, truth_csv, tmp_path):
    ids = list(truth.ImageID)
    base = _random_predictions(truth, seed=3)
    rng = np.random.default_rng(4)
    preds = [p + [lab for lab in ("12", "cat") if rng.random() < 0.1] for p in base]
    sub_base = _write_submission(tmp_path / "base.csv", ids, base)
    sub = _write_submission(tmp_path / "sub.csv", ids, preds, seed=2)
    r0 = score_submission(str(sub_base), str(truth_csv))
    r = score_submission(str(sub), str(truth_csv))

    # by hand: micro precision = TP / everything predicted, unknown labels included
    tp = sum(len(set(p) & set(t)) for p, t in zip(preds, truth.Labels))
    n_pred = sum(len(p) for p in preds)
    n_true = sum(len(t) for t in truth.Labels)
    n_unknown = sum(lab in ("12", "cat") for p in preds for lab in p)
    assert n_unknown > 100
    assert r["precision_micro"] == pytest.approx(tp / n_pred, abs=1e-12)
    assert r["recall_micro"] == pytest.approx(tp / n_true, abs=1e-12)
    assert r["f1_micro"] == pytest.approx(2 * tp / (n_pred + n_true), abs=1e-12)
    # the known labels are the same as in base, so only the precision side drops
    assert r["precision_micro"] < r0["precision_micro"]
    assert r["recall_micro"] == pytest.approx(r0["recall_micro"])
    assert r["f1_samples"] < r0["f1_samples"]
    # macro runs over the truth's 18 classes only: unaffected
    for k in ("f1_macro", "precision_macro", "recall_macro"):
        assert r[k] == pytest.approx(r0[k], abs=1e-12), k
    assert r["unknown_labels"] == {"12": sum("12" in p for p in preds), "cat": sum("cat" in p for p in preds)}
    # and the samples scores equal scikit-learn's with the unknown labels as extra, never-true columns
    vocab = sorted({lab for labs in truth.Labels for lab in labs}, key=int)
    cols = vocab + ["12", "cat"]
    expected = _sklearn(_matrix(truth.Labels, cols), _matrix(preds, cols), len(vocab))
    for k in ("f1_samples", "precision_samples", "recall_samples", "f1_micro", "precision_micro"):
        assert r[k] == pytest.approx(expected[k], abs=1e-9), k


def test_truth_with_empty_rows_scores_by_the_one_rule(tmp_path):
    """Images of none of the labels in the truth: predicting nothing for them scores 1, anything else 0,
    as scikit-learn with zero_division=1; a truth of nothing but such images can be scored too."""
    truth = tmp_path / "truth.csv"
    truth.write_text("ImageID,Labels\na.jpg,1 2\nb.jpg,\nc.jpg,\nd.jpg,2\n")
    sub = tmp_path / "sub.csv"
    sub.write_text("ImageID,Labels\na.jpg,1\nb.jpg,\nc.jpg,2\nd.jpg,\n")
    r = score_submission(str(sub), str(truth))
    cols = ["1", "2"]
    yt = _matrix([["1", "2"], [], [], ["2"]], cols)
    yp = _matrix([["1"], [], ["2"], []], cols)
    expected = _sklearn(yt, yp, 2)
    for k, v in expected.items():
        assert r[k] == pytest.approx(v, abs=1e-12), k
    assert r["f1_samples"] == pytest.approx((2 / 3 + 1 + 0 + 0) / 4)
    assert r["empty_truth"] == 2 and r["empty_predictions"] == 2

    none = tmp_path / "none.csv"
    none.write_text("ImageID,Labels\na.jpg,\nb.jpg,\n")
    quiet = tmp_path / "quiet.csv"
    quiet.write_text("ImageID,Labels\nb.jpg,\na.jpg,3\n")
    r = score_submission(str(quiet), str(none))
    assert r["f1_samples"] == pytest.approx(0.5) and r["unknown_labels"] == {"3": 1} and r["per_class"] == []
    assert math.isnan(r["f1_macro"])
    assert score_submission(str(none), str(none))["f1_samples"] == 1.0


# ---------------------------------------------------------------------------------------------
# jobs/score.py


def _run_score(*args):
    return subprocess.run([sys.executable, "jobs/score.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def score_job():
    spec = importlib.util.spec_from_file_location("mlc_test_jobs_score", REPO / "jobs" / "score.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_json(truth, truth_csv, tmp_path):
    preds = _random_predictions(truth, seed=5)
    sub = _write_submission(tmp_path / "sub.csv", list(truth.ImageID), preds)
    res = _run_score("--predictions", sub, "--truth", truth_csv, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert JSON_KEYS <= set(out)
    expected = score_submission(str(sub), str(truth_csv))
    for k in JSON_KEYS:
        assert out[k] == pytest.approx(expected[k], abs=1e-12), k
    assert "2000 images scored" in res.stdout


def test_cli_missing_ids(truth, truth_csv, tmp_path):
    ids, labels = list(truth.ImageID), list(truth.Labels)
    drop = {5, 17, 400, 1999}
    sub = tmp_path / "sub.csv"
    sub.write_text(submission_csv([i for k, i in enumerate(ids) if k not in drop],
                                  [l for k, l in enumerate(labels) if k not in drop]))
    res = _run_score("--predictions", sub, "--truth", truth_csv, "--json")
    assert res.returncode == 2
    assert "4 ImageID(s)" in res.stderr and "missing" in res.stderr
    assert "5.jpg, 17.jpg, 400.jpg, 1999.jpg" in res.stderr
    assert res.stdout.strip() == ""


def test_main_missing_many_ids_names_the_first(score_job, truth, truth_csv, tmp_path, capsys):
    sub = tmp_path / "sub.csv"
    sub.write_text(submission_csv(list(truth.ImageID[100:]), list(truth.Labels[100:])))
    args = argparse.Namespace(predictions=str(sub), truth=str(truth_csv), json=True)
    assert score_job.main(args) == 2
    err = capsys.readouterr().err
    assert "100 ImageID(s)" in err
    assert ", ".join(f"{i}.jpg" for i in range(10)) + " and 90 more" in err
    assert "10.jpg" not in err.split("and 90 more")[0].split(", ")  # only the first 10 are listed


def test_main_scores_in_process(score_job, truth, truth_csv, tmp_path, capsys):
    preds = _random_predictions(truth, seed=6)
    sub = _write_submission(tmp_path / "sub.csv", list(truth.ImageID), preds)
    args = score_job.get_args_parser().parse_args(["--predictions", str(sub), "--truth", str(truth_csv), "--json"])
    assert score_job.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    vocab = sorted({lab for labs in truth.Labels for lab in labs}, key=int)
    y_true, y_pred = _matrix(truth.Labels, vocab), _matrix(preds, vocab)
    assert out["f1_samples"] == pytest.approx(f1_score(y_true, y_pred, average="samples", zero_division=0), abs=1e-9)


def test_cli_extra_ids(truth, truth_csv, tmp_path):
    ids, labels = list(truth.ImageID), list(truth.Labels)
    sub = tmp_path / "sub.csv"
    sub.write_text(submission_csv(ids + ["99999.jpg", "cat.jpg"], labels + [["1"], ["2"]]))
    res = _run_score("--predictions", sub, "--truth", truth_csv)
    assert res.returncode == 2
    assert "2 ImageID(s)" in res.stderr and "not in" in res.stderr
    assert "99999.jpg, cat.jpg" in res.stderr


@pytest.mark.parametrize("text,line,fragment", [
    ("ImageID,Labels\n0.jpg,1\n1.jpg,1 19\n0.jpg,2\n", 4, "duplicate ImageID '0.jpg'"),
    ("ImageID,Predicted\n0.jpg,1\n", 1, "unexpected header"),
], ids=["duplicate_id", "wrong_header"])
def test_cli_malformed_predictions(truth_csv, tmp_path, text, line, fragment):
    sub = tmp_path / "sub.csv"
    sub.write_text(text)
    res = _run_score("--predictions", sub, "--truth", truth_csv, "--json")
    assert res.returncode == 2
    assert f"{sub}, line {line}:" in res.stderr
    assert fragment in res.stderr


def test_main_truth_without_labels(score_job, real_data, tmp_path, capsys):
    sub = tmp_path / "sub.csv"
    sub.write_text("ImageID,Labels\n30000.jpg,1\n")
    args = argparse.Namespace(predictions=str(sub), truth=str(real_data / "test.csv"), json=False)
    assert score_job.main(args) == 2
    err = capsys.readouterr().err
    assert "test.csv, line 1" in err and "Labels" in err


def test_score_submission_missing_file(truth_csv, tmp_path):
    with pytest.raises(SubmissionError, match="not found"):
        score_submission(str(tmp_path / "nope.csv"), str(truth_csv))
