"""Checkpoints: the one module that knows their layout. :func:`make` builds the resumable training state,
:func:`save_state` / :func:`load_state` write and read it, :func:`save_model` / :func:`read_model` a model folder;
files of earlier versions are upgraded as they are read (:func:`mlc.migrate.migrate`).

Layout under a run's output:
- ``checkpoint/state.pt``: one object holding everything needed to resume
  (bare model weights, optimizer, scheduler and loss-scaler states, epoch, best-so-far,
  history, config, label vocabulary, threshold, unreadable images, tokenizer, the weight average of --ema). One object, so it is never
  half written.
  It holds tensors and plain data only (dicts, lists, tuples, str, int, float, bool, None) and is read
  with ``torch.load(weights_only=True)``: a file in a shared bucket is data, never code, so whoever can
  write to the bucket cannot run anything on the nodes that resume from it.
- ``best/model.pt``: the bare state_dict, which for ``--inputs image`` loads into plain torchvision's
  ``resnet50(num_classes=N)`` (the caption and fused networks' keys are in :mod:`mlc.model.fusion`);
  ``best/labels.json``; ``best/tokenizer.json`` when
  the network reads captions (:mod:`mlc.data.tokenizer`); ``best/meta.json`` (config, threshold, epoch, metrics
  and the model file's sha256, so a reader can tell the files belong together).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import time

import numpy as np
import torch

from mlc.config import TrainConfig, uses_captions
from mlc.data.labels import LabelVocab
from mlc.data.tokenizer import Tokenizer
from mlc.io import storage
from mlc.logs import say
from mlc.migrate import migrate

STATE = "state.pt"
TOKENIZER = "tokenizer.json"


class CheckpointError(RuntimeError):
    pass


class ConfigMismatch(ValueError):
    """A checkpoint holds a run with other settings than the ones given to resume it."""


# Why a checkpoint was taken: at an epoch's end, or inside one (``step`` > 0) on a preemption notice, on a
# signal (SIGTERM, SIGINT) or because --checkpoint-every had passed.
REASONS = ("epoch", "preemption", "signal", "time")


def make(*, model: dict, optimizer, scheduler, scaler, epoch: int, best_f1: float, history: list,
         cfg: TrainConfig, vocab: LabelVocab, threshold: dict | None, bad_images: dict, tokenizer: Tokenizer | None,
         step: int = 0, so_far: dict | None = None, reason: str = "epoch", interruptions: list = (),
         micro_batch: int | None = None, table_key: str | None = None, ema: dict | None = None) -> dict:
    """The resumable training state (``model``: the bare module's state_dict) once ``epoch`` epochs and ``step``
    global batches of the next are done. ``so_far``: that next epoch's running totals (loss sum, images,
    steps, seconds), so its history row covers every step however often it was interrupted; ``reason`` one of
    :data:`REASONS`; ``interruptions`` every restart of the run so far (metrics.json lists them);
    ``micro_batch`` the rows per forward pass the run resolved; ``table_key`` what the training rows were
    (:attr:`mlc.data.run_data.RunData.key`): a resume inside an epoch must see the same rows in the same order;
    ``ema`` the weight average (:meth:`mlc.train.ema.Ema.to_dict`: decay, updates, the averaged tensors), which
    is the model validated and saved (:func:`scored_weights`)."""
    if reason not in REASONS:
        raise ValueError(f"checkpoint reason {reason!r} is not one of {REASONS}")
    return {"model": model, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch, "step": step,
            "so_far": dict(so_far or {}), "best_f1": best_f1, "history": history, "config": cfg.to_dict(),
            "labels": vocab.labels, "threshold": threshold, "bad_images": dict(bad_images),
            "tokenizer": tokenizer.to_dict() if tokenizer else None, "reason": reason, "saved_at": time.time(),
            "interruptions": list(interruptions), "micro_batch": micro_batch, "table_key": table_key, "ema": ema}


def scored_weights(state: dict) -> dict:
    """The weights a training state's validation scored and best/ keeps: the weight average's when the run keeps
    one (its averaged tensors over the model's frozen ones), else the model's."""
    if state.get("ema") is None:
        return state["model"]
    return {**state["model"], **state["ema"]["weights"]}


def model_meta(state: dict, metrics: dict) -> dict:
    """meta.json of the model in ``state`` (:func:`make`), with its validation ``metrics``."""
    return {"config": state["config"], "threshold": state["threshold"], "epoch": state["epoch"],
            "metrics": metrics, "tokenizer": state["tokenizer"], "table_key": state["table_key"]}


def run_meta(url: str) -> dict:
    """A model folder's meta.json (``<run>/best`` for a run folder), upgraded; no weights are read."""
    url = model_folder(url)
    if storage.exists(storage.join(url, "best", "meta.json")):
        url = storage.join(url, "best")
    path = storage.join(url, "meta.json")
    if not storage.exists(path):
        raise CheckpointError(f"{url}: no meta.json (not a finished run's folder or a model folder)")
    return migrate(json.loads(storage.read_bytes(path)), where=url, log=say)


def check_resumable(state: dict, cfg: TrainConfig, vocab: LabelVocab, url: str, table_key: str | None = None) -> None:
    """Refuse to resume ``state`` (read from ``url``) with settings, labels or rows that would train another model
    (batch size and seed among the settings: they decide the order of the rows)."""
    diff = cfg.differences(TrainConfig.from_dict(state["config"]))
    if diff:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ConfigMismatch(f"{url} holds a run with other settings ({listed}); rerun with the same flags to "
                             "resume, add --fresh to start over, or choose another --output/--name")
    if state["labels"] != vocab.labels:
        raise ConfigMismatch(f"{url} was trained on labels {state['labels']}, the data now has {vocab.labels}; "
                             "use --fresh or another --output")
    if state["table_key"] is not None and table_key is not None and state["table_key"] != table_key:
        raise ConfigMismatch(f"{url} was trained on other rows: the training table changed (rows added, removed, "
                             "reordered or relabelled), so the data order of its epochs would change; restore the "
                             "table, or use --fresh or another --output")


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def plain_data(obj, where: str = "state"):
    """``obj`` with numpy scalars and arrays turned into Python numbers and lists; tensors kept.

    What ``torch.load(weights_only=True)`` reads back: anything else (a class instance, a function)
    would need full unpickling to load, so it is refused here, naming where it sits.
    """
    if isinstance(obj, np.generic):  # before float: np.float64 is a float, but pickles as a numpy global
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: plain_data(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [plain_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return out if isinstance(obj, list) else tuple(out)
    if isinstance(obj, torch.dtype | torch.device):
        return str(obj)
    raise CheckpointError(f"cannot checkpoint {where}: {type(obj).__name__} is not plain data "
                          "(tensors, dicts, lists, numbers, strings)")


def save_state(url: str, state: dict) -> None:
    """Write ``url/state.pt`` atomically. Refuses non-finite weights and anything that is not plain data."""
    if not _all_finite(state["model"]):
        raise CheckpointError(f"refusing to write {url}: the model has non-finite weights")
    storage.write_bytes(storage.join(url, STATE), _torch_bytes(plain_data(state)))


def load_state(url: str) -> dict | None:
    """The state saved under ``url`` (in today's shape) or None if there is none.

    Read with ``weights_only=True``: a file that holds pickled Python objects (an old checkpoint, or one
    someone planted in the bucket) is refused before any of it runs.
    """
    path = storage.join(url, STATE)
    if not storage.exists(path):
        return None
    blob = storage.read_bytes(path)
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.split("error:", 1)[1].strip().split(" was not")[0] for line in str(e).splitlines()
                    if "WeightsUnpickler error:" in line), "weights_only load failed")
        raise CheckpointError(
            f"{path}: refused: it holds pickled Python objects ({why}), not only tensors and plain data, and "
            "loading it could run code from the file; nothing in it was run. Checkpoints written by mlc before "
            "safe loading look like this too: rerun with --fresh to start over") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot be read ({e}); rerun with --fresh to start over") from e
    return migrate(state, where=path, log=say)


def save_model(url: str, model_state: dict, vocab: LabelVocab, meta: dict) -> None:
    """Write ``model.pt`` (bare state_dict), ``labels.json``, ``tokenizer.json`` (from ``meta["tokenizer"]``,
    when the network reads captions) and ``meta.json`` under ``url``."""
    if not _all_finite(model_state):
        raise CheckpointError(f"refusing to write {url}: the model has non-finite weights")
    blob = _torch_bytes(model_state)
    storage.write_bytes(storage.join(url, "model.pt"), blob)
    storage.write_text(storage.join(url, "labels.json"), vocab.to_json())
    meta = dict(meta)
    tokenizer = meta.pop("tokenizer", None)
    if tokenizer is not None:
        text = json.dumps(tokenizer)
        storage.write_text(storage.join(url, TOKENIZER), text)
        meta["tokenizer_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    meta = dict(meta, labels=vocab.labels, model_sha256=hashlib.sha256(blob).hexdigest())
    # meta.json goes last: its presence, with a matching hash, marks the folder complete.
    storage.write_text(storage.join(url, "meta.json"), json.dumps(meta, indent=1, default=float))


def model_folder(url: str) -> str:
    """The folder a checkpoint argument names: itself, or the folder of a file in it (``best/model.pt``)."""
    url = str(url).rstrip("/")
    if url.rsplit("/", 1)[-1] in ("model.pt", "meta.json", "labels.json", TOKENIZER, STATE):
        return url.rsplit("/", 1)[0] if "/" in url else "."
    return url


def read_model(url: str) -> tuple[dict, LabelVocab, dict]:
    """Load ``(state_dict, vocab, meta)`` from a model folder, a training checkpoint folder, or a run's output.

    Accepts ``<run>/best``, ``<run>`` (uses its ``best/``), or ``<run>/checkpoint``, or a file in one of them
    (``best/model.pt``: its folder).
    """
    url = _resolved(url)
    if _is_model_folder(url):
        meta = migrate(json.loads(storage.read_bytes(storage.join(url, "meta.json"))), where=url, log=say)
        blob = storage.read_bytes(storage.join(url, "model.pt"))
        if meta.get("model_sha256") and hashlib.sha256(blob).hexdigest() != meta["model_sha256"]:
            raise CheckpointError(f"{url}: model.pt does not match meta.json (an interrupted write?); "
                                  "use the run's checkpoint/ or retrain")
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        if meta.get("tokenizer_sha256"):
            text = storage.read_bytes(storage.join(url, TOKENIZER)).decode()
            if hashlib.sha256(text.encode()).hexdigest() != meta["tokenizer_sha256"]:
                raise CheckpointError(f"{url}: {TOKENIZER} does not match meta.json; use the run's checkpoint/ "
                                      "or retrain")
            meta["tokenizer"] = json.loads(text)
        return state, LabelVocab(meta["labels"]), meta
    st = load_state(url)
    if st is None:
        raise CheckpointError(f"{url}: no model here (looked for meta.json + model.pt, best/, and {STATE})")
    return scored_weights(st), LabelVocab(st["labels"]), model_meta(st, {})


def _resolved(url: str) -> str:
    url = model_folder(url)
    return storage.join(url, "best") if storage.exists(storage.join(url, "best", "meta.json")) else url


def _is_model_folder(url: str) -> bool:
    return storage.exists(storage.join(url, "meta.json")) and storage.exists(storage.join(url, "model.pt"))


def read_meta(url: str) -> tuple[str, LabelVocab, dict]:
    """``(folder, vocab, meta)`` of the model :func:`read_model` would load from ``url``, without building its
    weights (what a report shows of it). ``meta["model_file_ok"]``: whether model.pt's sha256 is the one meta.json
    records (None when it records none, or for a checkpoint/ folder, whose state.pt is read whole)."""
    url = _resolved(url)
    if _is_model_folder(url):
        meta = migrate(json.loads(storage.read_bytes(storage.join(url, "meta.json"))), where=url, log=say)
        recorded = meta.get("model_sha256")
        ok = hashlib.sha256(storage.read_bytes(storage.join(url, "model.pt"))).hexdigest() == recorded \
            if recorded else None
        return url, LabelVocab(meta["labels"]), {**meta, "model_file_ok": ok}
    st = load_state(url)
    if st is None:
        raise CheckpointError(f"{url}: no model here (looked for meta.json + model.pt, best/, and {STATE})")
    return url, LabelVocab(st["labels"]), {**model_meta(st, {}), "model_file_ok": None}


def tokenizer_of(meta: dict, url: str) -> Tokenizer | None:
    """The caption tokenizer saved with a model (None for an image-only one); refuses a caption network
    saved without one."""
    cfg = TrainConfig.from_dict(meta["config"])
    if not uses_captions(cfg.inputs):
        return None
    if not meta.get("tokenizer"):
        raise CheckpointError(f"{url}: a --inputs {cfg.inputs} model saved without its {TOKENIZER}")
    return Tokenizer.from_dict(meta["tokenizer"], storage.join(url, TOKENIZER))
