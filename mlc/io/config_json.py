"""config.json: every run writes its effective settings there; ``--config FILE`` reads one back (upgraded from an
earlier version's shape by :func:`mlc.migrate.migrate`).

``config.json`` holds sections named after the config classes they fill: ``train`` (every TrainConfig
field, defaults included), ``scale`` (a Ray Train run's ScaleConfig), ``sweep`` (a sweep's SweepConfig),
``predict`` (jobs/predict.py's settings), plus ``local`` (train: one process or Ray), the mlc version, the git
commit when the code runs from a checkout, the job and the time. The ``train`` section records the settings
as the job got them: ``data`` stays ``null`` for the demo set (regenerated wherever the replay runs) and
``output`` is the ``--output`` given (a Ray run's folder is ``output/name``).

A sweep's ``best_config.json`` is read too: its ``config`` (the best trial's settings) becomes the ``train``
section without ``output`` (the trial's own folder inside the sweep, which a full run must not resume).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import subprocess
from pathlib import Path

from mlc.errors import UsageError
from mlc.io import storage
from mlc.logs import say
from mlc.migrate import migrate

NAME = "config.json"


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout this package runs from (with ``-dirty`` when it has changes), else None
    (an installed wheel, or Ray's copy of the working directory, which has no .git)."""
    root = Path(__file__).resolve().parents[2]  # mlc/io/config_json.py -> the checkout
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _plain(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return obj


def record(job: str, **sections) -> dict:
    from mlc import __version__
    return {"job": job, "mlc_version": __version__, "git_commit": git_commit(),
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **{k: _plain(v) for k, v in sections.items() if v is not None}}


def write_config(folder: str, job: str, *, name: str = NAME, **sections) -> dict:
    """Write ``folder/config.json`` (``name``) with ``sections`` (dataclasses or dicts); returns the record."""
    doc = record(job, **sections)
    storage.write_text(storage.join(folder, name), json.dumps(doc, indent=1, default=str) + "\n")
    return doc


@functools.lru_cache(maxsize=8)
def _read(url: str) -> str:
    try:
        return storage.read_bytes(url).decode()
    except (FileNotFoundError, storage.StorageError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {storage.safe_url(url)}: cannot read it ({e})") from None


def load_config(url: str) -> dict:
    """The sections of a ``config.json`` (or a sweep's ``best_config.json``) at a path or URL."""
    try:
        doc = json.loads(_read(str(url)))
    except json.JSONDecodeError as e:
        raise UsageError(f"--config {storage.safe_url(str(url))}: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise UsageError(f"--config {storage.safe_url(str(url))}: expected a JSON object")
    if "train" not in doc and isinstance(doc.get("config"), dict):  # a sweep's best_config.json
        train = {k: v for k, v in doc["config"].items() if k != "output"}
        doc = {**doc, "train": train}
    known = ("train", "scale", "sweep", "predict")
    if not any(k in doc for k in known):
        raise UsageError(f"--config {storage.safe_url(str(url))}: holds none of the sections {', '.join(known)}; "
                         "expected a run's config.json or a sweep's best_config.json")
    return migrate(doc, where=storage.safe_url(str(url)), log=say)
