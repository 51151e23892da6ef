"""Spot-native training: a step checkpoint when a notice comes (Ray's preemption notice, SIGTERM, SIGINT) or when
``--checkpoint-every`` has passed, polled on a schedule every rank shares; and the record of every interruption.

**The schedule.** Ray's ``get_preemption_info()`` is a barrier, and so is the agreement on whether a checkpoint
is due (rank 0's clock decides, and every rank learns it): every rank must poll at the same steps. Rank 0 says
at each poll when the next one is, so that polls come every :data:`POLL_PERIOD_S` of training whatever a step
costs (a GPU step at depth 1 is 1000x faster than a CPU step at depth 4); the first polls come every step.

**On a notice** rank 0 writes a step checkpoint (atomically: the group's way) at the step the notice was seen.
A signal then stops the process (exit 143 for SIGTERM, 130 for SIGINT); rerunning the command resumes at that
step. A preemption leaves the workers idle until Ray tears the group down at the notice's deadline and
restarts it from the checkpoint: no step is trained and then thrown away.

**Interruptions** (metrics.json ``interruptions``, one log line each): a run resumed from a checkpoint that its
own planned epochs had not finished: where, why (the checkpoint's reason; ``failure`` when it was not taken on
a notice), the steps trained after it and lost (from ``progress.json``, which rank 0 writes at most every
:data:`PROGRESS_EVERY_S`), and the seconds from the restart to its first step.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from mlc.config import parse_duration
from mlc.io import storage

# How often every rank polls for a notice, in seconds of training ($MLC_POLL_PERIOD_S; 0: every step). A Spot VM
# gets 30 s between its notice and its end, and Ray's watcher sees a drain within 5 s
# (RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S): 2 s more leaves 20 s for the checkpoint. The cost of one poll (two
# barriers) is in docs/measurements-spot.md.
POLL_PERIOD_S = float(os.environ.get("MLC_POLL_PERIOD_S", 2.0))
# --checkpoint-every auto: 50 times the last checkpoint's write time (2% of training), at least a minute; until a
# checkpoint has been written and timed, every ten minutes.
AUTO_FACTOR, AUTO_MIN_S, AUTO_FIRST_S = 50.0, 60.0, 600.0
# How stale progress.json may be: one small write per this many seconds of training.
PROGRESS_EVERY_S = 30.0
# After a preemption checkpoint, how long past the notice's deadline to wait for Ray's teardown before going on.
TEARDOWN_MARGIN_S = 60.0


class Stopped(Exception):
    """Training stopped on a signal after its step checkpoint; rerunning the same command resumes there."""
    signum = 0

    def __init__(self, where: str, epoch: int, step: int):
        super().__init__(f"stopped by {signal.Signals(self.signum).name} in epoch {epoch} after step {step}; a step "
                         f"checkpoint is in {where}: rerun the same command to continue from there")


class Terminated(Stopped):
    signum = signal.SIGTERM


class Interrupted(Stopped):
    signum = signal.SIGINT


@dataclass
class Notice:
    """A reason to checkpoint now: ``preemption`` (Ray; ``deadline_s``: when the node goes) or ``signal``."""
    reason: str
    signum: int | None = None
    deadline_s: float | None = None


class SignalListener:
    """SIGTERM and SIGINT, noted instead of killing the process, for the loop to act on at its next poll; a second
    SIGINT interrupts at once (Ctrl-C twice). Only the main thread can install handlers: elsewhere, nothing is
    caught and the signals keep their effect."""

    def __init__(self):
        self.signum: int | None = None
        self._saved: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._saved[s] = signal.signal(s, self._note)
        return self

    def _note(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._saved.items():
            signal.signal(s, handler)
        self._saved.clear()
        return False

    def notice(self) -> Notice | None:
        return Notice("signal", self.signum) if self.signum is not None else None


def checkpoint_every_s(setting: str, last_cost_s: float | None) -> float | None:
    """Seconds between time-based step checkpoints (None: at epoch ends only) for ``--checkpoint-every``."""
    if setting == "epoch":
        return None
    if setting == "auto":
        return AUTO_FIRST_S if last_cost_s is None else max(AUTO_MIN_S, AUTO_FACTOR * last_cost_s)
    return parse_duration(setting)


@dataclass
class Schedule:
    """Rank 0's view of when the next poll is and whether a checkpoint is due; every rank follows what rank 0
    decided at the last poll (:meth:`proposal`, agreed through the group). Steps count across epochs."""
    setting: str
    next_poll: int = 0          # the step (counted from the run's start) at which every rank polls next
    last_checkpoint: float = field(default_factory=lambda: time.monotonic())
    last_cost_s: float | None = None
    step_s: float | None = None  # rank 0's mean seconds per step since the last poll
    _mark: tuple = (0, 0.0)

    def proposal(self, step: int) -> tuple[bool, int]:
        """(a checkpoint is due, the step of the next poll), as rank 0 sees it after ``step``."""
        now = time.monotonic()
        done, then = self._mark
        if step > done:
            self.step_s = (now - then) / (step - done) if then else None
        self._mark = (step, now)
        every = checkpoint_every_s(self.setting, self.last_cost_s)
        due = every is not None and now - self.last_checkpoint >= every
        k = 1 if not self.step_s else min(1000, max(1, round(POLL_PERIOD_S / self.step_s)))
        return due, step + k

    def checkpointed(self, seconds: float) -> None:
        self.last_checkpoint, self.last_cost_s = time.monotonic(), seconds


def write_progress(url: str, epoch: int, step: int, last: list) -> None:
    """``progress.json`` in the run folder: how far training got, written at most every PROGRESS_EVERY_S
    (``last`` holds the time of the previous write)."""
    now = time.monotonic()
    if last and now - last[0] < PROGRESS_EVERY_S:
        return
    last[:] = [now]
    storage.write_text(storage.join(url, "progress.json"), json.dumps({"epoch": epoch, "step": step}))


def interruption(state: dict, steps_per_epoch: int, progress_url: str | None) -> dict | None:
    """The record of resuming ``state``, or None when its run had finished what it planned (a rerun with more
    epochs is no interruption). ``steps_lost`` is what progress.json says was trained after the checkpoint (a
    lower bound: it is written every PROGRESS_EVERY_S), 0 for a checkpoint taken on a notice."""
    epoch, step = state["epoch"], state["step"]
    if step == 0 and epoch >= state["config"]["epochs"]:
        return None
    reason = state["reason"] if state["reason"] in ("preemption", "signal") else "failure"
    lost = 0 if reason != "failure" else _steps_after(epoch, step, steps_per_epoch, progress_url)
    return {"epoch": epoch + 1, "step": step, "reason": reason, "steps_lost": lost, "saved_at": state["saved_at"]}


def _steps_after(epoch: int, step: int, steps_per_epoch: int, progress_url: str | None) -> int | None:
    if progress_url is None:
        return None
    try:
        p = json.loads(storage.read_bytes(storage.join(progress_url, "progress.json")))
    except (FileNotFoundError, ValueError, storage.StorageError):
        return None
    return max(0, (p["epoch"] - (epoch + 1)) * steps_per_epoch + p["step"] - step)


def first_step(record: dict, workers: int, since_start_s: float) -> dict:
    """``record`` completed at the first step after the restart: the world size, and the seconds from the
    process's start (and from the checkpoint's writing: the wait for the deadline, the restart) to that step."""
    saved_at = record.pop("saved_at", None)
    return {**record, "workers": workers, "restart_to_first_step_s": since_start_s,
            "checkpoint_to_first_step_s": time.time() - saved_at if saved_at else None}


def describe(record: dict) -> str:
    lost = "unknown" if record["steps_lost"] is None else record["steps_lost"]
    return (f"interruption: {record['reason']} in epoch {record['epoch']} after step {record['step']}: resumed on "
            f"{record['workers']} worker(s), {lost} step(s) lost, first step {record['restart_to_first_step_s']:.1f} s "
            f"after the restart")
