"""Figures over seeds: the mean and its standard error, as every accuracy claim in docs/ gives them."""

from __future__ import annotations

import math

import numpy as np


def mean_se(values) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (sample standard deviation over sqrt(n)); NaN for one value."""
    x = np.asarray(list(values), dtype=float)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return float(x.mean()), se
