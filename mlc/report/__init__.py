"""The run report a person opens: ``report.html`` with a run's identity and settings, the best epoch's metrics, the
per-class table, the plots, the validation images the model gets wrong (worst first, thumbnails beside their
captions, true and predicted labels), the label co-occurrence and a sample of the test predictions, in one file
that opens from disk with no server and no network.

:mod:`gather` reads what to show from a run's (or a prediction's) folder, :mod:`analysis` makes its rows from the
scores, :mod:`thumbs` the thumbnails, :mod:`html` and :mod:`page` the markup, and :mod:`build` fits it under the size
limit and writes it. Training and prediction call :func:`mlc.report.build.try_write_report`; jobs/report.py
rebuilds a report from a finished folder.

May import: io, data, model, eval and the top-level config, errors and logs; never prediction, train or Ray."""
