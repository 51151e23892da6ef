"""report.html of a run or a prediction: gathered (:mod:`mlc.report.gather`), its galleries filled with thumbnails
until the size limit, rendered (:mod:`mlc.report.html`) and written whole (a temporary name, then renamed).

Training (:func:`mlc.train.driver.drive`, local mode and Ray alike) and prediction (:func:`mlc.distributed.predict.
predict`, which jobs/predict.py calls) write it through :func:`try_write_report`: a report that cannot be built is one
warning line, never a failed run, and an earlier report.html that would now describe another run is removed.
jobs/report.py rebuilds one from a finished folder through :func:`write_report`.
"""

from __future__ import annotations

from collections import Counter

from mlc.io import storage
from mlc.report import analysis
from mlc.report.gather import Report, gather, image_url
from mlc.report.html import card, render
from mlc.report.limits import ERROR_SHARE, MAX_BYTES, MAX_ERRORS, MAX_TEST
from mlc.report.thumbs import STORE, UNREADABLE, open_thumbnails

NAME = "report.html"
# The counts in the section headers grow by a few bytes as cards are added; this much room is kept for them.
SLACK = 2_000


def write_report(folder: str, *, output: str | None = None, model: str | None = None, predicted: dict | None = None,
                 data=None, max_bytes: int = MAX_BYTES, max_errors: int = MAX_ERRORS, max_test: int = MAX_TEST,
                 log=print) -> dict:
    """Build the report of ``folder`` (see :func:`mlc.report.gather.gather` for ``model``, ``predicted`` and
    ``data``) and write it to ``output`` (default ``folder/report.html``). Returns where, its size and what it
    shows."""
    report = gather(folder, model=model, predicted=predicted, data=data, max_test=max_test)
    lookup = report.store_lookup or (None, None, None, None)
    with open_thumbnails(*lookup, folders=tuple(report.images.values())) as thumbs:
        text, shown = fit(report, thumbs, max_bytes, max_errors)
    output = output or storage.join(str(folder).rstrip("/"), NAME)
    storage.write_text(output, text)
    size = len(text.encode("utf-8"))
    log(f"wrote {output} ({size / 1e6:.2f} MB: {shown['errors']} of {len(report.errors)} validation errors and "
        f"{shown['test']} of {report.n_test} test predictions with thumbnails)")
    return {"path": output, "bytes": size, **shown}


def try_write_report(folder: str, *, log=print, **kwargs) -> str | None:
    """:func:`write_report`, or one warning line when it fails (and no stale report.html left): the run's other
    outputs stand. Returns the report's path, None when none was written."""
    try:
        return write_report(folder, log=log, **kwargs)["path"]
    except Exception as e:  # noqa: BLE001 - a report is never worth a finished run; the warning names the cause
        stale = storage.join(str(folder).rstrip("/"), NAME)
        removed = ""
        try:
            if storage.exists(stale):
                storage.remove(stale)
                removed = f"; removed the earlier {NAME}, which described another run"
        except Exception:  # noqa: BLE001
            removed = f"; the earlier {NAME} there could not be removed and describes another run"
        first = str(e).splitlines()[0][:300] if str(e) else ""
        log(f"warning: report.html not written ({type(e).__name__}: {first}){removed}; the run's other outputs "
            f"are complete. Rebuild it with: python jobs/report.py --run {folder}")
        return None


def fit(report: Report, thumbs, max_bytes: int, max_errors: int) -> tuple[str, dict]:
    """The page with as many cards as fit in ``max_bytes``: the worst errors first (up to ``max_errors``), then the
    test sample, then more errors with the room the sample left. Cards are prefixes of their lists, so the errors
    shown are always the worst ones. Returns the page and ``{"errors", "test", "thumbnails"}`` (shown, and where
    the shown thumbnails came from)."""
    confusions = analysis.top_confusions(report.co) if report.co is not None else []
    empty = render(report, [], [], confusions, _thumbs_note(report, Counter()))
    room = max_bytes - _size(empty) - SLACK
    while room < 0 and report.plots:  # plots are the only other large part
        name, blob = report.plots.pop()
        report.notes.append(f"plot {name} left out to stay under {max_bytes / 1e6:g} MB")
        room += len(blob) * 4 // 3
    if room < 0:
        raise ValueError(f"the report without images is {_size(empty)} bytes, over the limit of {max_bytes}")
    errors = _cards(report.errors[:max_errors], report, thumbs, "validation", ERROR_SHARE * room)
    used = sum(_size(c) for c, _ in errors)
    test = _cards(report.test, report, thumbs, "test", room - used)
    used += sum(_size(c) for c, _ in test)
    errors += _cards(report.errors[len(errors):max_errors], report, thumbs, "validation", room - used,
                     first_rank=len(errors))
    while True:
        counts = Counter(src for _, src in errors + test)
        text = render(report, [c for c, _ in errors], [c for c, _ in test], confusions, _thumbs_note(report, counts))
        if _size(text) <= max_bytes or not (errors or test):
            break
        (test if len(test) * 2 > len(errors) else errors).pop()  # only when the slack was too small
    if _size(text) > max_bytes:
        raise ValueError(f"the report is {_size(text)} bytes, over the limit of {max_bytes}")
    return text, {"errors": len(errors), "test": len(test), "thumbnails": dict(counts)}


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _cards(items: list, report: Report, thumbs, split: str, room: float, first_rank: int = 0) -> list:
    """``(card, thumbnail source)`` of ``items`` in order while they fit in ``room`` bytes (a thumbnail is made only
    for a card tried)."""
    out, used = [], 0
    for k, item in enumerate(items):
        uri, source, problem = _thumbnail(thumbs, report.images[split], item.image_id)
        html = card(item, report.labels, uri, first_rank + k, problem)
        if used + _size(html) > room:
            break
        out.append((html, source))
        used += _size(html)
    return out


def _thumbnail(thumbs, images: str, image_id: str) -> tuple:
    try:
        url = image_url(images, image_id)
    except ValueError as e:  # an ImageID that would leave the image folder: no image is read for it
        return None, UNREADABLE, str(e).splitlines()[0][:160]
    return thumbs.get(image_id, url)


def _thumbs_note(report: Report, counts: Counter) -> str:
    shown = ", ".join(f"{n} from {src}" for src, n in sorted(counts.items()) if src != UNREADABLE) or "none"
    where = (f"validation images from {report.images['validation']}, test images from {report.images['test']}"
             if report.images["validation"] != report.images["test"] else f"images from {report.images['test']}")
    store = "" if counts[STORE] else (
        " No store of this run was on this machine (--store off, a run that streamed, a network that reads no "
        "images, or a store on another node), so every thumbnail was decoded again from the image folder by mlc's "
        "image loader." if report.by_run else
        " Thumbnails of a report built after its run are decoded again from the image folder by mlc's image loader "
        "(through its byte cache for remote images).")
    bad = f" {counts[UNREADABLE]} images could not be read and show no thumbnail." if counts[UNREADABLE] else ""
    return f"Thumbnails: {shown} ({where}).{store}{bad}"
