"""mlc.data.labels.LabelVocab: the real label set, ordering, encode/decode, JSON, and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlc.data.labels import LabelVocab

REAL_LABELS = [str(i) for i in range(1, 20) if i != 12]


def test_real_vocabulary(real_train):
    vocab = LabelVocab.from_label_lists(real_train.Labels)
    assert len(vocab) == 18
    assert vocab.labels == REAL_LABELS
    assert "12" not in vocab.labels
    assert vocab.labels.index("2") < vocab.labels.index("10")  # numeric, not text order
    assert vocab.index["1"] == 0 and vocab.index["13"] == 11 and vocab.index["19"] == 17


def test_numeric_order_regardless_of_input_order():
    vocab = LabelVocab.from_label_lists([["10", "2"], ["1"], ["19", "3"]])
    assert vocab.labels == ["1", "2", "3", "10", "19"]


def test_non_integer_labels_sort_as_text():
    vocab = LabelVocab.from_label_lists([["dog", "10"], ["2", "cat"], ["Bird"]])
    assert vocab.labels == ["10", "2", "Bird", "cat", "dog"]


def test_labels_are_strings():
    vocab = LabelVocab.from_label_lists([[3, 1], [2]])
    assert vocab.labels == ["1", "2", "3"]
    assert vocab.encode([["2"]]).tolist() == [[0.0, 1.0, 0.0]]


def test_encode_decode_round_trip_real(real_train):
    vocab = LabelVocab.from_label_lists(real_train.Labels)
    labels = list(real_train.Labels[:3000])
    m = vocab.encode(labels)
    assert m.shape == (3000, 18) and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0}
    assert m.sum(axis=1).tolist() == [len(set(labs)) for labs in labels]
    assert m[1].tolist() == [1.0 if lab in ("1", "19") else 0.0 for lab in REAL_LABELS]  # 1.jpg -> 1 19
    decoded = vocab.decode(m)
    # decode gives vocabulary (numeric) order; as sets the round trip is exact
    assert decoded == [sorted(set(labs), key=int) for labs in labels]
    assert vocab.decode(m.astype(bool)) == decoded
    assert vocab.decode(vocab.encode(decoded)) == decoded


def test_decode_order_and_empty_rows():
    vocab = LabelVocab(["1", "2", "10"])
    assert vocab.decode([[1, 0, 1], [0, 0, 0], [0, 1, 0]]) == [["1", "10"], [], ["2"]]
    assert vocab.encode([["10", "1"], []]).tolist() == [[1, 0, 1], [0, 0, 0]]


def test_unknown_label_raises_naming_the_row():
    vocab = LabelVocab(REAL_LABELS)
    with pytest.raises(ValueError) as ei:
        vocab.encode([["1"], ["3"], ["5", "12"]], context="val.csv ")
    msg = str(ei.value)
    assert "row 2" in msg and "'12'" in msg and msg.startswith("val.csv ")


def test_json_round_trip():
    vocab = LabelVocab(["1", "2", "10", "cat"])
    text = vocab.to_json()
    assert json.loads(text) == {"labels": ["1", "2", "10", "cat"]}
    back = LabelVocab.from_json(text)
    assert back == vocab and back.labels == vocab.labels and back.index == vocab.index
    assert back != LabelVocab(["1", "10", "2", "cat"])  # order is part of the vocabulary


def test_json_round_trip_real(real_train):
    vocab = LabelVocab.from_label_lists(real_train.Labels)
    assert LabelVocab.from_json(vocab.to_json()) == vocab


def test_duplicates_rejected():
    with pytest.raises(ValueError, match="duplicates"):
        LabelVocab(["1", "2", "1"])
    with pytest.raises(ValueError, match="duplicates"):
        LabelVocab(["1", 1])  # the same label once stringified


def test_empty_rejected():
    with pytest.raises(ValueError, match="empty"):
        LabelVocab.from_label_lists([[], []])
