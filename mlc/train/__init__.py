"""One run in this process: the epoch functions (:mod:`engine`), the one training loop (:mod:`local`,
which Ray Train's workers run too), checkpoints, a run's outputs, predictions and its folder, TensorBoard,
config.json replay, inference from a checkpoint and the --inputs comparison.

May import: io, data, model, eval and the top-level config, errors and logs; never Ray."""
