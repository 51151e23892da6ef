"""How a run's labelled rows are split into training and validation (``--split``): by a keyed hash of each ImageID
(:func:`hash_split`, mlc's first split) or by iterative stratification (:func:`stratified_split`, Sechidis,
Tsoumakas and Vlahavas, "On the Stratification of Multi-Label Data", ECML PKDD 2011), which keeps every label's
share of the rows the same in both parts; and the largest gap between those shares (:func:`largest_gap`).

Both are deterministic given the seed and depend on the ImageIDs and labels only, never on the order of the rows.
"""

from __future__ import annotations

import hashlib

import numpy as np

SPLITS = ("stratified", "hash")


def _keys(image_ids, seed: int) -> list[bytes]:
    key = str(seed).encode()
    return [hashlib.blake2b(str(i).encode(), digest_size=8, key=key).digest() for i in image_ids]


def validation_size(n: int, fraction: float) -> int:
    n_val = int(np.ceil(fraction * n))
    if n_val < 1 or n_val >= n:
        raise ValueError(f"--val-fraction {fraction} of {n} training rows leaves an empty train or validation set")
    return n_val


def hash_split(image_ids, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each id ranked by a keyed hash; the ``ceil(fraction * n)`` smallest are the validation rows."""
    ids = list(image_ids)
    n_val = validation_size(len(ids), fraction)
    h = _keys(ids, seed)
    order = sorted(range(len(ids)), key=lambda i: h[i])
    return np.sort(np.array(order[n_val:])), np.sort(np.array(order[:n_val]))


def stratified_split(image_ids, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sechidis et al.'s iterative stratification into two parts (training, validation) of ``1 - fraction`` and
    ``fraction`` of the rows.

    Each part wants its share of every label's rows. Repeatedly, the label with the fewest rows left (the
    rarest: the one a careless split would get most wrong) has each of its rows placed in the part that still
    wants most of that label, ties going to the part that wants most rows, then to a seeded draw; a placed row
    lowers its part's wants for every label it carries. Rows with no label are placed last, by rows wanted.
    A part that has its ``ceil(fraction * n)`` (validation) or remaining (training) rows takes no more, so the
    sizes are the hash split's. The rows are visited in the order of a keyed hash of their ImageIDs, so the
    split is the same for any order of the table's rows.
    """
    ids = list(image_ids)
    n = len(ids)
    n_val = validation_size(n, fraction)
    y = np.asarray(y, dtype=bool)
    h = _keys(ids, seed)
    order = np.array(sorted(range(n), key=lambda i: h[i]), dtype=np.int64)
    rng = np.random.default_rng(seed)
    share = np.array([(n - n_val) / n, n_val / n])
    wants_label = share[:, None] * y.sum(axis=0)[None, :]   # (part, label)
    wants_rows = np.array([n - n_val, n_val], dtype=np.float64)
    part = np.full(n, -1, dtype=np.int64)
    left = y[order].copy()  # rows (in hash order) x labels, of the rows not placed yet
    while True:
        counts = left.sum(axis=0)
        if not counts.any():
            break
        fewest = counts[counts > 0].min()
        label = rng.choice(np.flatnonzero(counts == fewest))
        for k in np.flatnonzero(left[:, label]):
            row = order[k]
            j = _choose(wants_label[:, label], wants_rows, rng)
            part[row] = j
            wants_label[j] -= y[row]
            wants_rows[j] -= 1
            left[k] = False
    for row in order[part[order] < 0]:  # no label at all
        j = _choose(wants_rows, wants_rows, rng)
        part[row] = j
        wants_rows[j] -= 1
    return np.flatnonzero(part == 0), np.flatnonzero(part == 1)


def _choose(wants: np.ndarray, wants_rows: np.ndarray, rng) -> int:
    open_ = wants_rows > 0  # a part that has all its rows takes no more: the sizes come out exact
    wants = np.where(open_, wants, -np.inf)
    best = np.flatnonzero(wants == wants.max())
    if len(best) > 1:
        best = best[wants_rows[best] == wants_rows[best].max()]
    return int(best[0] if len(best) == 1 else rng.choice(best))


def split_rows(method: str, image_ids, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(training rows, validation rows)`` by ``method`` (one of :data:`SPLITS`)."""
    if method == "hash":
        return hash_split(image_ids, fraction, seed)
    if method == "stratified":
        return stratified_split(image_ids, y, fraction, seed)
    raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {method!r}")


def largest_gap(y: np.ndarray, train: np.ndarray, val: np.ndarray) -> tuple[float, int]:
    """The largest difference, over labels, between a label's share of the training rows and of the validation
    rows, and that label's column."""
    y = np.asarray(y, dtype=np.float64)
    gaps = np.abs(y[train].mean(axis=0) - y[val].mean(axis=0))
    return float(gaps.max()), int(gaps.argmax())
