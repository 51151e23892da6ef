"""How big a report gets: its size limit and the galleries' caps (light to import: jobs/report.py's --help shows
them)."""

# 5 MB opens at once from disk or as a mail attachment in any browser and holds several hundred thumbnails beside the
# plots (a card is 2-4 KB); the demo and real-data reports are measured in docs/report.md.
MAX_BYTES = 5_000_000
# The worst validation errors shown at most: past the worst 200 the images are the model's everyday mistakes, which
# the per-class table and the co-occurrence already count.
MAX_ERRORS = 200
# Test rows sampled: enough to judge whether the predictions look plausible, spread over the whole table.
MAX_TEST = 60
# The errors' share of the room for thumbnails: they are what a report is opened for; what the test sample leaves
# goes back to them.
ERROR_SHARE = 0.7
# Labels in the co-occurrence table, the most frequent first: a grid of 40 labels fits a screen's width and is 0.26 MB
# (18 labels: 53 KB); it grows with the square of the labels (80: 1 MB, a thousand: 160 MB), so past 40 the grid
# would crowd the thumbnails out of the size limit. Measured in docs/report.md.
MAX_CO_LABELS = 40
