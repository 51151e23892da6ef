"""Saved settings and checkpoints of earlier versions, upgraded in one place (:func:`migrate`), once, as they are
read: a config.json, a model's meta.json, a training checkpoint's state, or a bare TrainConfig dict.

Each old shape has a test (tests/test_migrate.py), and a folder written by an earlier version is kept in
tests/fixtures/ and resumed there. The code that reads settings sees only today's shape.
"""

from __future__ import annotations

import copy

# TrainConfig keys that no longer exist, and what a reader is told when one was set to something other than
# its old default (a setting that changed nothing is dropped without a word).
REMOVED = {
    "gpu_decode": (False, "--gpu-decode was removed (the decode-once image store replaced it); images are decoded "
                          "on the CPUs once per node"),
}
# Keys renamed: old -> new.
RENAMED = {"num_workers": "loader_workers"}  # the DataLoader's setting, before Ray's --num-workers existed
# TrainConfig keys added since the first config.json, and the value that reproduces a file written before them
# (a replayed config.json, a resumed checkpoint, a model's meta.json train and score as they did).
ADDED = {"split": "hash", "val_table": None, "refit": None, "loss": "bce", "asl_gamma_neg": 4.0, "asl_gamma_pos": 0.0,
         "asl_clip": 0.05, "focal_gamma": 2.0, "pos_weight": "none", "ema": 0.0, "model": "resnet50", "tta": "none"}
# Keys a training checkpoint has had since they were added, and their value in one saved before.
STATE_DEFAULTS = {"tokenizer": None, "scaler": None, "bad_images": {}, "threshold": None, "step": 0, "so_far": {},
                  "reason": "epoch", "saved_at": None, "interruptions": [], "micro_batch": None, "table_key": None, "ema": None}


def migrate(doc: dict, *, resolved: bool = False, where: str = "", log=None) -> dict:
    """``doc`` in today's shape (a new dict; ``doc`` is left as it was).

    ``doc`` is a TrainConfig dict, or holds one: a training state or a model's meta.json (``config``, saved
    *resolved*: what the network read, never auto) or a config.json (``train``, as the job was given it).
    ``resolved`` says which a bare dict is. ``log`` (``mlc.logs.say`` in the jobs) gets one line per removed
    setting that was on; ``where`` names the file in it.
    """
    doc = dict(doc)
    if "model" in doc and "config" in doc:  # a training state
        for key, value in STATE_DEFAULTS.items():
            doc.setdefault(key, copy.copy(value))
    if isinstance(doc.get("config"), dict):  # a training state or a model's meta.json
        doc["config"] = _train(doc["config"], True, where, log)
        return doc
    if isinstance(doc.get("train"), dict):  # a config.json
        doc["train"] = _train(doc["train"], False, where, log)
        return doc
    return _train(doc, resolved, where, log)


def _train(d: dict, resolved: bool, where: str, log) -> dict:
    d = dict(d)
    for old, new in RENAMED.items():
        if old in d:
            d.setdefault(new, d.pop(old))
    if isinstance(d.get("compile"), bool):  # on/off, before --compile auto existed
        d["compile"] = "on" if d["compile"] else "off"
    if resolved and d.get("inputs", "auto") == "auto":  # a model saved before --inputs existed read images only
        d["inputs"] = "image"
    # Every settings file mlc reads was written whole by mlc (config.json, best_config.json, a checkpoint, a
    # meta.json): a setting missing from one did not exist yet when it was written.
    for key, value in ADDED.items():
        d.setdefault(key, value)
    for key, (default, notice) in REMOVED.items():
        if key in d and d.pop(key) != default and log is not None:
            log(f"notice: {where + ': ' if where else ''}{notice}")
    return d
