"""Bytes: every location read and written through fsspec (:mod:`storage`), a byte cache with read-ahead
(:mod:`fetch`), bytes to RGB with format and pixel checks (:mod:`images`), one writer per output (:mod:`lock`),
file stamps for keys (:mod:`identity`), and config.json, a run's settings written and read back
(:mod:`config_json`).

May import: only the top-level config, errors, logs and migrate; everything else builds on it."""
