"""Judging scores: multi-label metrics (:mod:`metrics`, checked against scikit-learn), threshold strategies
(:mod:`thresholds`), PNG plots, and a submission scored against labels (:mod:`scoring`). Arrays in,
numbers out: no networks, no training.

May import: :mod:`mlc.io`, :mod:`mlc.data` and the top-level config, errors and logs; never model, train
or distributed."""
