"""Config fields that carry their own rules: a dataclass field with its ``--help`` text and its allowed values
(``choices``) or range (``bounds``) in its metadata, and the checks every config class runs on them (values
outside their choices or bounds, NaN and infinities). :mod:`mlc.config` declares the settings with these.
"""

from __future__ import annotations

import dataclasses
import math


def field(default, help: str, choices: tuple | None = None, bounds: str | None = None):
    """A field with its ``--help`` text and, when only some values are allowed, those values (``choices``) or
    their range (``bounds``: ``">= 1"``, ``"> 0"``, ``"0..4"``, ``"[0, 1)"``; a note may follow in brackets)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "bounds": bounds})


def _within(value, bounds: str) -> bool:
    rule = bounds.split(" (")[0]
    if ".." in rule:
        lo, hi = rule.split("..")
        return float(lo) <= value <= float(hi)
    if rule[0] in "[(":
        lo, hi = (float(x) for x in rule[1:-1].split(","))
        return (lo <= value if rule[0] == "[" else lo < value) and (value <= hi if rule[-1] == "]" else value < hi)
    op, limit = rule.split()[:2]
    return value >= float(limit) if op == ">=" else value > float(limit)


def bound_problems(cfg) -> list:
    """Every setting outside its declared bounds (None, where a setting allows it, means auto)."""
    out = []
    for f in dataclasses.fields(cfg):
        bounds, value = f.metadata.get("bounds"), getattr(cfg, f.name)
        if bounds and isinstance(value, (int, float)) and math.isfinite(value) and not _within(value, bounds):
            out.append(f"--{f.name.replace('_', '-')} must be {'in ' if bounds[0] in '[(' else ''}{bounds}, got {value}")
    return out


def parse_duration(text: str) -> float | None:
    """Seconds of ``90s``, ``10m``, ``1h`` or a bare number of seconds; None if ``text`` is none of these."""
    t = str(text).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    try:
        value = float(t[:-1]) if scale else float(t)
    except ValueError:
        return None
    seconds = value * (scale or 1)
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def choices_of(cls, name: str) -> tuple | None:
    """The values field ``name`` of config class ``cls`` allows (None: any of its type)."""
    return next(f.metadata.get("choices") for f in dataclasses.fields(cls) if f.name == name)


def choice_problems(cfg) -> list:
    out = []
    for f in dataclasses.fields(cfg):
        allowed, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if allowed is not None and value not in allowed:
            out.append(f"--{f.name.replace('_', '-')} must be {', '.join(map(str, allowed[:-1]))} or {allowed[-1]}, "
                       f"got {value}")
    return out


def non_finite(cfg) -> list:
    """Every float setting that is NaN or infinite: ``float("nan") <= 0`` is False, so a range check alone lets
    ``--lr nan`` through to fail deep in torch (or ``--lr inf`` to train a whole epoch of NaNs)."""
    out = []
    for f in dataclasses.fields(cfg):
        values = getattr(cfg, f.name)
        for v in values if isinstance(values, tuple) else (values,):
            if isinstance(v, float) and not math.isfinite(v):
                out.append(f"--{f.name.replace('_', '-')} must be a finite number, got {v}")
                break
    return out
