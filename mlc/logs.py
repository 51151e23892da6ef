"""Job logs that read well in a terminal and in a file (``ray job logs``, a KubeRay pod, ``nohup``).

Messages go through the ``mlc`` logger: one line each, with a timestamp, the level when it is not
INFO, and ``[rank N]`` in a Ray Train worker. ``--quiet`` turns progress off (no bars, heartbeats or phase
lines), ``--verbose`` adds debug lines (and tracebacks of expected errors, :func:`mlc.cli.run_job`).

Progress: an interactive tqdm bar only when stderr is a terminal. Anywhere else (a file, a pipe, a Ray
worker, whose output Ray forwards line by line) a bar's carriage returns make one unreadable line, so
:func:`progress` logs a heartbeat line at most every ``HEARTBEAT_S`` seconds (step, img/s, loss, ETA)
and one line when the phase ends.

The library's functions take ``log=`` callables (``print`` by default in older code); :func:`say` is the
one the jobs pass: a message starting with ``warning:`` is logged as a warning, the rest as info.
"""

from __future__ import annotations

import logging
import sys
import time

LOGGER = logging.getLogger("mlc")
# Often enough that a watcher sees the run is alive, rarely enough that a 10-hour run's log stays readable
# (at most 120 lines an hour per phase).
HEARTBEAT_S = 30.0
QUIET, NORMAL, VERBOSE = -1, 0, 1


class LineFormatter(logging.Formatter):
    """``2026-12-02 01:30:00 [rank 1] warning: message``: the level only when it is not INFO."""

    def __init__(self, rank: int | None = None):
        super().__init__(datefmt="%Y-%m-%d %H:%M:%S")
        self.prefix = f"[rank {rank}] " if rank is not None else ""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"{self.formatTime(record, self.datefmt)} {self.prefix}{level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(verbosity: int = NORMAL, rank: int | None = None, stream=None) -> logging.Logger:
    """Send the ``mlc`` logger's records, one line each, to ``stream`` (default: stdout, where the jobs'
    results have always been printed); replaces what an earlier call set up. ``propagate`` is off so a
    record is written once, also in a Ray Train worker, whose root logger Ray Train configures itself."""
    for h in list(LOGGER.handlers):
        if getattr(h, "_mlc", False):
            LOGGER.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler._mlc = True
    handler.setFormatter(LineFormatter(rank))
    LOGGER.addHandler(handler)
    # --quiet keeps its documented meaning, no progress display (the jobs pass progress=False: no bars,
    # heartbeats or phase lines); the plan, resume and result lines still print, as scripts that grep a quiet
    # run's log expect.
    LOGGER.setLevel(logging.DEBUG if verbosity == VERBOSE else logging.INFO)
    LOGGER._mlc_verbosity = verbosity
    LOGGER.propagate = False
    return LOGGER


def verbosity() -> int:
    """This process's setting, to pass on to the processes it starts (Ray workers); NORMAL when not set up."""
    return getattr(LOGGER, "_mlc_verbosity", NORMAL)


def say(message: str) -> None:
    """Log one message: ``warning: ...`` as a warning (prefix dropped; the formatter adds the level), else info."""
    if not LOGGER.handlers:
        setup()  # used as a library without a job: still print, as the functions' ``print`` defaults did
    text = str(message)
    for line in text.strip("\n").splitlines() or [""]:
        if line.startswith("warning: "):
            LOGGER.warning(line[len("warning: "):])
        else:
            LOGGER.info(line)


def interactive(stream=None) -> bool:
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress(iterable, *, desc: str, total: int | None = None, enabled: bool = True, unit: str = "batch",
             every_s: float = HEARTBEAT_S, log=None, clock=time.monotonic):
    """A tqdm bar on a terminal; elsewhere a :class:`Heartbeat`; the bare iterable when not ``enabled``.
    Both take ``set_postfix(loss=..., img_s=...)``."""
    if not enabled:
        return Heartbeat(iterable, desc=desc, total=total, every_s=float("inf"), log=lambda *_: None, clock=clock)
    if interactive():
        from tqdm.auto import tqdm
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False)
    return Heartbeat(iterable, desc=desc, total=total, every_s=every_s, log=log or say, clock=clock)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Heartbeat:
    """Iterates ``iterable``; logs ``desc: step i/N, img/s, loss, ETA`` at most every ``every_s`` seconds and
    ``desc: done, N steps in T`` at the end. The timestamp comes from the log line itself."""

    def __init__(self, iterable, *, desc: str, total: int | None, every_s: float, log, clock=time.monotonic):
        self.iterable, self.desc, self.every_s, self.log, self.clock = iterable, desc, every_s, log, clock
        try:
            self.total = total if total is not None else len(iterable)
        except TypeError:
            self.total = None
        self.postfix: dict = {}
        self.step = 0

    def set_postfix(self, **values) -> None:
        self.postfix.update(values)

    def _line(self, elapsed: float) -> str:
        parts = [f"step {self.step}" + (f"/{self.total}" if self.total else "")]
        parts += [f"{v} img/s" if k == "img_s" else f"{k} {v}" for k, v in self.postfix.items()]
        if self.total and self.step:
            parts.append(f"ETA {_duration(elapsed / self.step * (self.total - self.step))}")
        return f"{self.desc}: " + ", ".join(parts)

    def __iter__(self):
        start = last = self.clock()
        for item in self.iterable:
            yield item
            self.step += 1
            now = self.clock()
            if now - last >= self.every_s:
                last = now
                self.log(self._line(now - start))
        if self.every_s != float("inf"):
            self.log(f"{self.desc}: done, {self.step} steps in {_duration(self.clock() - start)}")

    def __len__(self) -> int:
        return self.total or 0
