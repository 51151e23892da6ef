"""``--refit RUN``: the submission's model trained on every labelled row, as Kaggle practice has it.

A finished run chose its settings, its number of epochs (its best epoch) and its threshold on a validation
split; the refit trains with those settings for that many epochs on the training and validation rows together
(nothing is held out, so nothing is validated), keeps the run's threshold, and predicts the test table. Its
log, config.json (``refit`` section) and metrics.json say where the threshold came from.
"""

from __future__ import annotations

import os

from mlc.config import TrainConfig
from mlc.errors import UsageError
from mlc.io import storage
from mlc.model.checkpoint import CheckpointError, ConfigMismatch, load_state, run_meta
from mlc.train.run_folder import latest_epoch_checkpoint

# What decides which rows a run validated on: the run's own values are kept to recompute its split.
SPLIT_SETTINGS = ("split", "val_fraction", "seed", "val_table")


def _meta(run_url: str) -> dict:
    try:
        return run_meta(run_url)
    except CheckpointError:
        raise UsageError(f"--refit {storage.safe_url(run_url)}: not a finished run (no best/meta.json); give the "
                         "folder of a run that has finished") from None


def source(run_url: str) -> dict:
    """Where a refit's threshold and epochs come from: the run's best model."""
    meta = _meta(run_url)
    if meta["threshold"] is None:
        raise UsageError(f"--refit {storage.safe_url(run_url)}: its best model has no threshold")
    return {"run": run_url, "from": storage.join(run_url, "best", "meta.json"), "epoch": meta["epoch"],
            "threshold": meta["threshold"], "f1_samples": (meta.get("metrics") or {}).get("f1_samples")}


def section(cfg: TrainConfig) -> dict | None:
    """config.json's ``refit`` section: the run refitted, and where the threshold and the epochs came from."""
    if not cfg.refit:
        return None
    src = source(cfg.refit)
    return {"run": src["run"], "threshold": src["threshold"], "threshold_from": src["from"],
            "epochs_from": f"the run's best epoch ({src['epoch']})",
            "run_validation_f1_samples": src["f1_samples"]}


def settings(run_url: str) -> dict:
    """The settings a refit starts from: the run's config.json as it was given, for the run's best epoch's number
    of epochs (flags given to the refit override them)."""
    from mlc.io.config_json import load_config
    epochs = source(run_url)["epoch"]  # first: a folder that is no finished run is named as such
    saved = dict(load_config(storage.join(run_url, "config.json")).get("train") or {})
    return {**saved, "epochs": epochs, "refit": run_url}


def _same_place(a: str, b: str) -> bool:
    if storage.is_local(a) and storage.is_local(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")


def check(cfg: TrainConfig, run_folder: str, prepare) -> None:
    """Before anything is written: the refit writes a folder of its own, and trains on the table its run was
    trained on (``prepare(cfg)``: the run's data as :func:`mlc.data.run_data.prepare_data` makes it)."""
    run = cfg.refit
    if _same_place(run_folder, run):
        raise UsageError(f"--refit {storage.safe_url(run)}: the refit would write into the run it refits; give "
                         "another --output (and --name on Ray)")
    meta = _meta(run)
    key = meta.get("table_key")
    if key is None:  # a run saved before meta.json kept it: its checkpoint has it
        latest = storage.join(run, "checkpoint") if storage.exists(storage.join(run, "checkpoint", "state.pt")) \
            else latest_epoch_checkpoint(run)
        key = (load_state(latest) or {}).get("table_key") if latest else None
    if key is None:
        return  # a run too old to say which rows it trained on: nothing to compare
    trained = TrainConfig.from_dict(meta["config"])
    mine = prepare(cfg.replace(refit=None, **{k: getattr(trained, k) for k in SPLIT_SETTINGS})).key
    if mine != key:
        raise ConfigMismatch(f"--refit {storage.safe_url(run)}: that run was trained on another table than "
                             f"{storage.safe_url(cfg.train_csv or storage.join(cfg.data or '', 'train.csv'))} "
                             "(rows, labels or validation table differ), so its threshold and epochs do not carry "
                             "over; refit with the run's own tables (--data, --train-csv, --val-table)")
