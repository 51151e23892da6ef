"""A run folder: where epochs, best/ and Ray's own bookkeeping live, and how best/ is published (what Ray
Train itself kept is read in :mod:`mlc.distributed.ray_folder`).

``<run>/`` holds one ``epoch_NNNN/`` per checkpoint Ray Train kept (each a complete local-mode folder:
``state.pt``, ``model.pt``, ``labels.json``, ``meta.json``, validation predictions), the latest step checkpoint
``epoch_NNNN_step_SSSSSS/`` when one was taken inside epoch NNNN+1 (``state.pt`` only: its weights are not
validated; it has no score, so Ray Train deletes it once a later checkpoint comes), Ray Train's
``checkpoint_manager_snapshot.json`` (which checkpoints it kept, with their metrics; the source of truth
for resume and for choosing best/), and, once the run has finished, ``best/`` and local mode's outputs.
A sweep folder holds one such run folder per trial, named by the trial id.
"""

from __future__ import annotations

import os

from mlc.io import storage

# The metric that orders checkpoints: the same validation F1 that picks local mode's best/.
SCORE = "f1_samples"
EPOCH_PREFIX = "epoch_"
# Copied to best/; meta.json last, so a best/ with meta.json is complete.
BEST_FILES = ("model.pt", "labels.json", "val_predictions.csv", "val_probabilities.csv", "meta.json")
# Copied too when the checkpoint has them (a network that reads captions), removed from best/ otherwise:
# a sweep's best/ may hold an image+caption trial's tokenizer.json before an image-only trial's model.
OPTIONAL_BEST_FILES = ("tokenizer.json",)


def epoch_dir(epoch: int, step: int = 0) -> str:
    """The folder of the checkpoint after ``epoch`` epochs and ``step`` global batches of the next: in name order,
    as in training order."""
    return f"{EPOCH_PREFIX}{epoch:04d}" + (f"_step_{step:06d}" if step else "")


def epoch_of(name: str) -> int:
    """The epochs done in the checkpoint folder ``name`` (a step checkpoint's: those before its epoch)."""
    return int(os.path.basename(name.rstrip("/"))[len(EPOCH_PREFIX):].split("_")[0])


def latest_epoch_checkpoint(run_url: str) -> str | None:
    """The newest checkpoint folder (``epoch_NNNN``, or a step checkpoint's) under ``run_url`` that holds a
    state.pt."""
    if not storage.isdir(run_url):
        return None
    names = sorted((n for n in storage.listdir(run_url) if n.startswith(EPOCH_PREFIX)), reverse=True)
    for n in names:
        if storage.exists(storage.join(run_url, n, "state.pt")):
            return storage.join(run_url, n)
    return None


def best_of(kept: list) -> tuple[int, dict]:
    """``(epoch, metrics)`` of the best of ``kept`` ((epoch, metrics) pairs): the highest validation F1,
    the earliest epoch among equals (as local mode keeps it). Only checkpoints that exist are offered."""
    scored = [(m[SCORE], -e, e, m) for e, m in kept if m.get(SCORE) is not None and m[SCORE] == m[SCORE]]
    if not scored:
        raise LookupError("no kept checkpoint has a validation score")
    best = max(scored, key=lambda t: (t[0], t[1]))
    return best[2], best[3]


def publish_best(run_url: str, epoch: int, dst: str) -> None:
    """Copy ``<run>/epoch_NNNN``'s model files to ``dst``; meta.json last, so a complete best/ is never mistaken."""
    src = storage.join(run_url, epoch_dir(epoch))
    missing = [n for n in BEST_FILES if not storage.exists(storage.join(src, n))]
    if missing:
        raise FileNotFoundError(f"{src}: cannot publish it as best/: {', '.join(missing)} missing")
    for n in OPTIONAL_BEST_FILES:
        if storage.exists(storage.join(src, n)):
            storage.write_bytes(storage.join(dst, n), storage.read_bytes(storage.join(src, n)))
        elif storage.exists(storage.join(dst, n)):
            storage.remove(storage.join(dst, n))
    for n in BEST_FILES:
        storage.write_bytes(storage.join(dst, n), storage.read_bytes(storage.join(src, n)))
