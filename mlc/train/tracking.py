"""TensorBoard event files for every run: per-epoch scalars and, at the end, per-class F1.

Written by rank 0 under ``<run>/tensorboard/`` (a sweep's trials under ``<sweep>/tensorboard/<trial>/``,
so ``tensorboard --logdir <sweep>/tensorboard`` shows them side by side). The writer is tensorboardX, which
Ray already depends on; its own remote-filesystem support covers S3 and HDFS, not fsspec URLs, so for a
``gs://`` (or any non-local) run the events go to a local temporary folder and every file is copied through
:mod:`mlc.io.storage` at each epoch's end. A resumed run adds a new event file beside the old ones (TensorBoard
reads them all). TensorBoard itself is not a dependency: view the events with ``pip install tensorboard``.

Tracking never stops a run: a writer that cannot be created or an upload that fails is a warning.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile

from mlc.io import storage

# The history row's keys, by TensorBoard tag: grouped so each panel compares like with like.
SCALARS = {
    "loss/train": "train_loss", "loss/val": "val_loss",
    "f1/samples": "f1_samples", "f1/micro": "f1_micro", "f1/macro": "f1_macro", "map/val": "map",
    "lr": "lr", "img_per_s/train": "train_img_per_s", "img_per_s/val": "val_img_per_s",
    "images/skipped": "skipped_images", "workers": "workers",
}


class Board:
    """One run's TensorBoard events at ``url`` (local path or any URL :mod:`mlc.io.storage` writes)."""

    def __init__(self, url: str, log=print):
        self.url, self.log, self.writer, self.tmp = url, log, None, None
        try:
            from tensorboardX import SummaryWriter
            if storage.is_local(url):
                folder = storage.filesystem(url)[1]
            else:
                folder = self.tmp = tempfile.mkdtemp(prefix="mlc-tensorboard-")
            os.makedirs(folder, exist_ok=True)
            # flush_secs: events reach the disk at least every 30 s even within a long epoch; flush() at each
            # epoch's end does the rest.
            self.writer = SummaryWriter(folder, flush_secs=30)
        except Exception as e:  # noqa: BLE001 - tracking is optional; the run goes on
            self.log(f"warning: no TensorBoard events for this run ({type(e).__name__}: {e})")

    def epoch(self, row: dict) -> None:
        if self.writer is None:
            return
        step = int(row["epoch"])
        for tag, key in SCALARS.items():
            v = row.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(tag, float(v), step)
        t = row.get("threshold") or {}
        if isinstance(t.get("value"), (int, float)):
            self.writer.add_scalar(f"threshold/{t.get('strategy', 'value')}", float(t["value"]), step)
        self.writer.add_text("threshold/strategy", str(t.get("strategy", "")), step)
        self.flush()

    def per_class(self, labels: list, f1: list, ap: list | None, step: int) -> None:
        """The best epoch's per-class F1 (and AP): one scalar per label, at that epoch's step."""
        if self.writer is None:
            return
        for i, label in enumerate(labels):
            self.writer.add_scalar(f"f1_per_class/{label}", float(f1[i]), step)
            if ap is not None and ap[i] is not None and math.isfinite(float(ap[i])):
                self.writer.add_scalar(f"ap_per_class/{label}", float(ap[i]), step)
        self.flush()

    def finish(self, labels: list, history: list) -> None:
        """The best epoch's per-class scores, then close."""
        if history and history[-1]["f1_per_class"]:  # (a refit validates nothing)
            best = max(history, key=lambda r: r["f1_samples"])
            self.per_class(labels, best["f1_per_class"], best.get("ap_per_class"), best["epoch"])
        self.close()

    def flush(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        self._upload()

    def _upload(self) -> None:
        if self.tmp is None:
            return
        try:
            for root, _, files in os.walk(self.tmp):
                for name in files:
                    path = os.path.join(root, name)
                    with open(path, "rb") as f:
                        storage.write_bytes(storage.join(self.url, os.path.relpath(path, self.tmp)), f.read())
        except Exception as e:  # noqa: BLE001 - the next epoch tries again
            self.log(f"warning: could not copy TensorBoard events to {storage.safe_url(self.url)}: {e}")

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()  # flushes what flush() may still hold in the writer's queue
        self.writer = None
        self._upload()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
