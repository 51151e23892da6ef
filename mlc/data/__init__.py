"""Data in: the tables (:mod:`table`), the label vocabulary, the caption tokenizer, the embedded demo set, a run's
data and split (:mod:`run_data`), rows made into batches (:mod:`batch`, :mod:`sources`: streamed or through the
decode-once :mod:`store`, which :mod:`store_choice` places) and the loaders that deal them to ranks
(:mod:`loader`), transforms and device crops (:mod:`transforms`, :mod:`augment`), and the dataset check behind
jobs/check_data.py.

May import: :mod:`mlc.io` and the top-level config, errors, logs and migrate."""
