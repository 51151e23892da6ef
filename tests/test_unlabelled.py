"""Images with no labels (COCO's ~1%, most of a defect or moderation set) are all-negative training examples:
a table with some trains and predicts; one with nothing but them, or any with --require-labels, is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlc.config import TrainConfig
from mlc.data.demo import make_demo_dataset
from mlc.data.table import read_table, submission_csv

REPO = Path(__file__).resolve().parents[1]
EMPTY_ROWS = (5, 23)  # two of forty, as COCO128's 000000000250.jpg and 000000000508.jpg


def _rewrite_train(root: Path, empty_rows) -> None:
    """train.csv as ImageID,Labels with the Labels of ``empty_rows`` cleared (the images stay)."""
    df = read_table(str(root / "train.csv"))
    labels = [[] if i in empty_rows else labs for i, labs in enumerate(df.Labels)]
    (root / "train.csv").write_text(submission_csv(df.ImageID, labels))


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory) -> Path:
    root = Path(make_demo_dataset(str(tmp_path_factory.mktemp("coco-like")), n_train=40, n_test=8, image_size=32,
                                  seed=5))
    _rewrite_train(root, EMPTY_ROWS)
    return root


def test_a_table_with_unlabelled_images_trains_on_them_and_predicts(coco_like, tmp_path):
    from mlc.train.driver import fit
    from mlc.data.run_data import prepare_data
    cfg = TrainConfig(data=str(coco_like), output=str(tmp_path / "run"), weights="none", image_size=32, epochs=2,
                      batch_size=8, unfrozen_depth=4, dropout=0.0, val_fraction=0.25, amp="off", inputs="image",
                      loader_workers=0, store="off")
    logs = []
    data = prepare_data(cfg, log=logs.append)
    empty_ids = {data.train_df.ImageID[i] for i in EMPTY_ROWS}
    # Their targets are all-negative rows, in the split like any other row; the vocabulary is what occurs.
    assert [i for i in range(len(data.Y)) if not data.Y[i].any()] == list(EMPTY_ROWS)
    assert data.vocab.labels == sorted({x for labs in data.train_df.Labels for x in labs}, key=int)
    assert any("2 of 40 labelled rows have an empty Labels field" in line for line in logs), logs

    summary = fit(cfg, log=logs.append, progress=False)
    out = tmp_path / "run"
    pred = read_table(str(out / "predictions.csv"))
    assert len(pred) == 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["scoring"]["zero_division"] == 1.0
    assert summary["best"]["f1_samples"] == metrics["best"]["f1_samples"]
    val = read_table(str(out / "best" / "val_predictions.csv"))
    assert len(val) == 10 and empty_ids <= set(data.train_df.ImageID)


def _job(*args, timeout=180):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_an_all_empty_table_is_refused_and_require_labels_names_the_first_empty_row(tmp_path):
    root = Path(make_demo_dataset(str(tmp_path / "d"), n_train=12, n_test=4, image_size=32, seed=6))
    original = (root / "train.csv").read_bytes()
    _rewrite_train(root, range(12))
    r = _job("jobs/train.py", "--local", "--data", root, "--output", tmp_path / "out", "--weights", "none")
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith("error: ") and str(root / "train.csv") in r.stderr and "nothing to learn" in r.stderr
    assert not (tmp_path / "out").exists()

    (root / "train.csv").write_bytes(original)
    _rewrite_train(root, (3,))
    r = _job("jobs/train.py", "--local", "--data", root, "--output", tmp_path / "out", "--weights", "none",
             "--require-labels")
    assert r.returncode == 3, r.stderr
    assert f"{root / 'train.csv'}, line 5: empty Labels field" in r.stderr and "--require-labels" in r.stderr

    r = _job("jobs/check_data.py", "--data", root, "--json")
    report = json.loads(r.stdout.splitlines()[-1])
    assert r.returncode == 0 and report["unlabelled_rows"] == 1 and "rows with no labels: 1 of 12" in r.stdout
    r = _job("jobs/check_data.py", "--data", root, "--require-labels")
    assert r.returncode == 1 and "line 5: empty Labels" in r.stdout
