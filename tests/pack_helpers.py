"""Packs for tests and benchmarks: one written in this process shard by shard (what each Ray Data task of
jobs/pack.py does), and a synthetic one of many small images (``jobs/bench.py --pack``: how long a large pack
takes to open), generated here, never committed."""

from __future__ import annotations

import io
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

from mlc.data import pack_write
from mlc.data.pack_write import PackConfig, pack_in_process


def pack_here(log=lambda *_: None, **kw) -> dict:
    """``jobs/pack.py`` without Ray (:func:`mlc.data.pack_write.pack_in_process`), its settings as keywords."""
    return pack_in_process(PackConfig(**kw), log=log)


def synthetic_pack(root: Path, n: int, rows_per_shard: int = 4096) -> str:
    """A pack of ``n`` training rows (20 labels, a caption each) whose images are one tiny JPEG: tables and
    manifest as large as a real pack of ``n`` images, shards of ``rows_per_shard`` rows (4,096 is a 64 MiB shard
    of 16 KB images, the real COMP5329 slots'), without reading ``n`` files."""
    source = root / "source"
    (source / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 20, size=(n, 2))
    lines = ["ImageID,Labels,Caption"] + [f"{i}.jpg,{a} {b},a synthetic image number {i}" for i, (a, b) in
                                          enumerate(labels)]
    (source / "train.csv").write_text("\n".join(lines) + "\n")
    (source / "test.csv").write_text("ImageID,Caption\n0t.jpg,a test image\n")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    tiny = {"image": buf.getvalue(), "height": 8, "width": 8, "orig_height": 8, "orig_width": 8, "reason": ""}

    def encode_rows(images, ids, *args):
        return [tiny] * len(ids)
    out = root / "pack"
    with mock.patch.object(pack_write, "encode_rows", encode_rows):
        pack_here(data=str(source), output=str(out), shard_mb=rows_per_shard * len(tiny["image"]) / 2**20)
    return str(out)
