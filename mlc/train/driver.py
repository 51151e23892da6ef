"""The run driver: the steps around training that every run takes, in one place for local mode and Ray
(:func:`drive`), and local mode's entry point (:func:`fit`).

In order, holding the output folder's lock (:mod:`mlc.io.lock`): read the tables and check the images and the
weights; check that a checkpoint there can be resumed with these settings; only then replace the previous run
(``--fresh``) and write config.json (a resume rewrites it only once it has succeeded); train; write the outputs
(:func:`mlc.train.outputs.finish`) and report.html (:mod:`mlc.report`; a report that fails is a warning). What differs between the modes (where the previous checkpoint is, what
``--fresh`` removes, how training runs) is a :class:`Mode`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Protocol

from mlc.config import TrainConfig, uses_images
from mlc.data.demo import with_demo_data
from mlc.data.run_data import RunData, prepare_data
from mlc.data.store import Keep
from mlc.io import storage
from mlc.io.config_json import write_config
from mlc.io.lock import hold
from mlc.model.checkpoint import check_resumable, load_state
from mlc.model.backbones import check_model
from mlc.model.weights import load_weights
from mlc.report.build import try_write_report
from mlc.train.group import LocalGroup
from mlc.train.loop import Trained, train
from mlc.train import refit
from mlc.train.outputs import finish
from mlc.train.run_folder import latest_epoch_checkpoint

# Everything a local run writes under --output; --fresh removes these (and nothing else of the folder).
OUTPUTS = ("checkpoint", "best", "metrics.json", "predictions.csv", "probabilities.csv", "plots", "config.json",
           "tensorboard", "report.html")


class Mode(Protocol):
    """What differs between running here and on Ray Train."""
    what: str                       # how the lock names the run

    def previous(self) -> str | None:
        """Where the checkpoint a rerun resumes from is, if there is one."""

    def before_start(self, cfg: TrainConfig, data: RunData) -> None:
        """Checks that need the data (the weights, the cluster's room); they fail before anything is replaced."""

    def owned(self) -> list[str]:
        """The names in the folder that ``--fresh`` replaces."""

    def write_config(self) -> None:
        """config.json of this run."""

    def train(self, cfg: TrainConfig, data: RunData) -> tuple[Trained, dict]:
        """Train; ``(what training hands back, finish()'s mode-specific arguments)``."""


def drive(cfg: TrainConfig, url: str, mode: Mode, *, fresh: bool, log, progress: bool) -> dict:
    """One run in the folder ``url`` (``cfg.output`` is it), from the checks to the outputs."""
    t_start = time.perf_counter()
    storage.check_writable(url)
    with hold(url, what=mode.what, log=log):
        check_model(cfg.model)  # an unknown name, or timm not installed
        data = prepare_data(cfg, log)  # unreadable tables, a wrong image folder: before anything is replaced
        if cfg.refit:
            refit.check(cfg, url, lambda run_cfg: prepare_data(run_cfg, lambda *_: None))
        previous = None if fresh else mode.previous()
        if previous is not None:
            state = load_state(previous)
            # Compared as the training processes compare it: --inputs auto resolved against the tables.
            check_resumable(state, cfg.replace(inputs=data.inputs), data.vocab, previous, data.key)
            log(_resume_line(previous, state, cfg.epochs))
        mode.before_start(cfg, data)
        if fresh:
            replace(url, mode.owned(), log)
        if previous is None:
            mode.write_config()
        # The decode-once store outlives training until the report has its thumbnails (Keep: the last process to
        # close it leaves it to Keep's end, which removes it).
        with Keep() if uses_images(data.inputs) and cfg.store != "off" else contextlib.nullcontext():
            trained, extra = mode.train(cfg, data)
            summary = finish(cfg, url, data, trained.history, trained.bad_images, t_start=t_start, log=log,
                             progress=progress, precision=trained.precision, device=trained.device,
                             interruptions=trained.interruptions, **extra)
            summary["report"] = try_write_report(url, model=url, data=data, log=log)
        if previous is not None:
            mode.write_config()
        return summary


def _resume_line(previous: str, state: dict, epochs: int) -> str:
    if state["step"]:
        return (f"resuming from {previous}: epoch {state['epoch'] + 1} continues after step {state['step']} "
                f"({state['reason']} checkpoint)")
    if state["epoch"] < epochs:
        return f"resuming from {previous}: epoch {state['epoch']} done, training continues at epoch " \
               f"{state['epoch'] + 1} of {epochs}"
    return f"resuming from {previous}: all {state['epoch']} epochs done; writing the outputs"


def replace(url: str, names: list[str], log) -> None:
    """--fresh, once every check has passed: remove the previous run's ``names`` from ``url``."""
    old = [n for n in names if storage.exists(storage.join(url, n))]
    if old:
        log(f"--fresh: replacing the previous run in {url} ({', '.join(old[:8])}{', ...' if len(old) > 8 else ''})")
    for name in old:
        storage.remove(storage.join(url, name), recursive=True)


class LocalMode:
    """Training in this process: the folder is ``--output`` itself."""

    def __init__(self, given: TrainConfig, url: str, *, log, progress: bool, on_step: Callable | None = None):
        self.given, self.url, self.log, self.progress, self.on_step = given, url, log, progress, on_step
        self.what = "a training run"

    def previous(self) -> str | None:
        if storage.exists(storage.join(self.url, "checkpoint", "state.pt")):
            return storage.join(self.url, "checkpoint")
        return latest_epoch_checkpoint(self.url)  # a Ray Train run's folder: local mode continues it

    def before_start(self, cfg: TrainConfig, data: RunData) -> None:
        load_weights(cfg.weights, cfg.model)  # a file that is not a state dict, or imagenet out of reach, fails now

    def owned(self) -> list[str]:
        return list(OUTPUTS)

    def write_config(self) -> None:
        write_config(self.url, "train", local=True, train=self.given, refit=refit.section(self.given))

    def train(self, cfg: TrainConfig, data: RunData) -> tuple[Trained, dict]:
        trained = train(cfg, LocalGroup(self.url), data, log=self.log, progress=self.progress, on_step=self.on_step)
        return trained, {}


def fit(cfg: TrainConfig, *, fresh: bool = False, log=print, progress: bool = True, on_step=None) -> dict:
    """Local mode: train in this process, then write every output under ``cfg.output``."""
    given = cfg  # as the caller gave it: data=None (the demo set) stays None in config.json
    cfg = with_demo_data(cfg, log)
    return drive(cfg, cfg.output, LocalMode(given, cfg.output, log=log, progress=progress, on_step=on_step),
                 fresh=fresh, log=log, progress=progress)
