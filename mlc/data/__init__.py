"""Data in: the tables (:mod:`table`), the label vocabulary, the caption tokenizer, the embedded demo set,
datasets and loaders (:mod:`datasets`, :mod:`loader`), transforms, the device JPEG decoder and the dataset
check behind jobs/check_data.py.

May import: :mod:`mlc.io` and the top-level config, errors and logs."""
