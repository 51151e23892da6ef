"""The train/validation split (mlc.data.splits) on the real table: iterative stratification keeps every label's
share, deterministically and whatever the rows' order; the hash split stays for replayed runs; and a validation
table of one's own (--val-table), with the tables it refuses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import mlc
from mlc.config import TrainConfig
from mlc.data.labels import LabelVocab
from mlc.data.splits import hash_split, largest_gap, split_rows, stratified_split
from mlc.migrate import migrate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real(real_train):
    vocab = LabelVocab.from_label_lists(real_train.Labels)
    return real_train.ImageID.tolist(), vocab.encode(real_train.Labels), vocab


def test_stratified_keeps_every_labels_share_where_the_hash_split_does_not(real):
    ids, y, vocab = real
    for seed in (0, 1):
        tr, va = stratified_split(ids, y, 0.2, seed)
        assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(ids)))
        assert len(va) == 6000  # ceil(0.2 n), as the hash split
        gap, _ = largest_gap(y, tr, va)
        hash_gap, _ = largest_gap(y, *hash_split(ids, 0.2, seed))
        assert gap < 0.0035 and gap * 2 < hash_gap, (seed, gap, hash_gap)
        # the rarest labels, placed first, to within a row or two of their share
        counts = y.sum(axis=0)
        for c in np.flatnonzero(counts < 1000):
            assert abs(y[va, c].sum() - 0.2 * counts[c]) <= 2, (vocab.labels[c], y[va, c].sum(), counts[c])


def test_both_splits_are_seeded_and_independent_of_the_rows_order(real):
    ids, y, _ = real
    ids, y = ids[:3000], y[:3000]
    perm = np.random.default_rng(5).permutation(len(ids))
    for method in ("stratified", "hash"):
        tr, va = split_rows(method, ids, y, 0.2, 7)
        tr2, va2 = split_rows(method, [ids[i] for i in perm], y[perm], 0.2, 7)
        assert sorted(ids[i] for i in va) == sorted(ids[perm[i]] for i in va2)
        again = split_rows(method, ids, y, 0.2, 7)
        assert np.array_equal(again[1], va)
        assert not np.array_equal(split_rows(method, ids, y, 0.2, 8)[1], va)


def test_small_tables_rows_without_labels_and_impossible_fractions():
    ids = [f"{i}.jpg" for i in range(5)]
    y = np.array([[1, 0], [1, 0], [0, 0], [0, 0], [0, 1]])
    tr, va = stratified_split(ids, y, 0.4, 0)
    assert len(tr) and len(va) and sorted([*tr, *va]) == list(range(5))
    single = stratified_split(ids[:2], np.array([[1, 0], [1, 0]]), 0.5, 0)
    assert len(single[0]) == len(single[1]) == 1
    with pytest.raises(ValueError, match="leaves an empty train or validation set"):
        stratified_split(ids[:1], y[:1], 0.5, 0)


def test_new_runs_stratify_and_a_config_json_from_before_the_split_replays_with_hash(tmp_path):
    assert TrainConfig().split == "stratified"
    old = TrainConfig(data="/d").to_dict()
    for key in ("split", "loss", "ema", "pos_weight", "val_table"):
        old.pop(key)
    written = tmp_path / "config.json"
    written.write_text(json.dumps({"job": "train", "mlc_version": "0.1.0", "train": old}))
    sys.path.insert(0, str(REPO / "jobs"))
    import train as train_job
    from mlc.cli import config_from_args
    cfg = config_from_args(train_job.get_args_parser().parse_args(["--config", str(written)]))
    assert (cfg.split, cfg.loss, cfg.ema, cfg.pos_weight) == ("hash", "bce", 0.0, "none")
    again = config_from_args(train_job.get_args_parser().parse_args(["--config", str(written), "--split",
                                                                    "stratified"]))
    assert again.split == "stratified"  # a flag given wins over the file
    assert migrate({"model": {}, "config": old})["config"]["split"] == "hash"  # an old checkpoint: as it trained


def _tables(root: Path, train_rows, val_rows) -> None:
    from test_captions import _dataset
    _dataset(root, n=24, images=False)
    lines = (root / "train.csv").read_text().splitlines()
    (root / "train.csv").write_text("\n".join([lines[0], *[lines[1 + i] for i in train_rows]]) + "\n")
    (root / "val.csv").write_text("\n".join([lines[0], *[lines[1 + i] for i in val_rows]]) + "\n")


def test_a_validation_table_validates_and_every_training_row_trains(tmp_path):
    root = tmp_path / "ds"
    _tables(root, range(16), range(16, 24))
    out = tmp_path / "run"
    logs: list = []
    cfg = TrainConfig(data=str(root), output=str(out), inputs="caption", weights="none", epochs=1, batch_size=8,
                      amp="off", loader_workers=0, lr=0.05, val_table=str(root / "val.csv"))
    mlc.fit(cfg, log=logs.append, progress=False)
    row = json.loads((out / "metrics.json").read_text())["epochs"][0]
    assert row["train_images"] == 16 and row["val_images"] == 8
    val_ids = mlc.read_table(str(out / "best" / "val_predictions.csv")).ImageID.tolist()
    assert val_ids == [f"{i}.jpg" for i in range(16, 24)]
    assert any("16 train / 8 validation, validation table" in line for line in logs), logs


@pytest.mark.parametrize("case,message", [
    ("unknown label", "row 2 (17.jpg) has label '9', which no row of"),
    ("overlap", "2 of its ImageIDs are in"),
])
def test_a_validation_table_with_unknown_labels_or_training_rows_is_refused(tmp_path, capsys, case, message):
    root = tmp_path / "ds"
    _tables(root, range(16), range(16, 24) if case == "unknown label" else [14, 15, 16, 17])
    if case == "unknown label":
        text = (root / "val.csv").read_text().splitlines()
        text[2] = text[2].replace("17.jpg,1,", "17.jpg,1 9,")
        (root / "val.csv").write_text("\n".join(text) + "\n")
    sys.path.insert(0, str(REPO / "jobs"))
    import train as train_job
    from mlc.cli import run_job
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_job(train_job.main, train_job.get_args_parser(),
                ["--local", "--data", str(root), "--output", str(out), "--inputs", "caption", "--weights", "none",
                 "--val-table", str(root / "val.csv")])
    err = capsys.readouterr().err
    assert e.value.code == 3 and message in err, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == err.strip().splitlines()[-1:]
    assert not out.exists() or not any(p.name != ".mlc.lock" for p in out.iterdir())
