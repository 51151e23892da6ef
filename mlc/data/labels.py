"""The label vocabulary: which output column means which original label string.

The real set has 18 labels (1..19 without 12). Indexing outputs by label id, as
the 2020 report did with 20 outputs, wastes columns and breaks when ids are not
contiguous; the vocabulary maps columns to the original strings instead and is
saved with every model.
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence

import numpy as np


class LabelVocab:
    def __init__(self, labels: Sequence[str]):
        labels = [str(x) for x in labels]
        if len(set(labels)) != len(labels):
            raise ValueError(f"label vocabulary has duplicates: {labels}")
        if not labels:
            raise ValueError("label vocabulary is empty: the training table has no labels")
        self.labels = labels
        self.index = {lab: i for i, lab in enumerate(labels)}

    @classmethod
    def from_label_lists(cls, label_lists: Iterable[Sequence[str]]) -> "LabelVocab":
        """Every label seen in training, sorted numerically when all are integers, else as text."""
        seen = {str(lab) for labs in label_lists for lab in labs}
        if seen and all(_is_int(s) for s in seen):
            ordered = sorted(seen, key=int)
        else:
            ordered = sorted(seen)
        return cls(ordered)

    def __len__(self) -> int:
        return len(self.labels)

    def __eq__(self, other) -> bool:
        return isinstance(other, LabelVocab) and other.labels == self.labels

    def __repr__(self) -> str:
        return f"LabelVocab({self.labels})"

    def encode(self, label_lists: Iterable[Sequence[str]], *, context: str = "") -> np.ndarray:
        """Multi-hot matrix (N, C) of float32. An unknown label is an error, never dropped."""
        label_lists = list(label_lists)
        out = np.zeros((len(label_lists), len(self.labels)), dtype=np.float32)
        for row, labs in enumerate(label_lists):
            for lab in labs:
                col = self.index.get(str(lab))
                if col is None:
                    raise ValueError(f"{context}row {row}: label {lab!r} is not in the vocabulary {self.labels}")
                out[row, col] = 1.0
        return out

    def decode(self, multi_hot) -> list[list[str]]:
        """Label strings per row, in vocabulary order (numeric for the real set)."""
        arr = np.asarray(multi_hot).astype(bool)
        return [[self.labels[c] for c in np.flatnonzero(r)] for r in arr]

    def to_json(self) -> str:
        return json.dumps({"labels": self.labels}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "LabelVocab":
        return cls(json.loads(text)["labels"])


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False
