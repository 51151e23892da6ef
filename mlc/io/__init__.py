"""Bytes: every location read and written through fsspec (:mod:`storage`), a byte cache with read-ahead
(:mod:`fetch`), and bytes to RGB with format and pixel checks (:mod:`images`).

May import: nothing of mlc (no tables, no torch models); everything else builds on it."""
