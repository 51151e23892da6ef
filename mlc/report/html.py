"""A :class:`mlc.report.gather.Report` as HTML: the sections (:func:`render`) and the gallery cards (:func:`card`).
Every text that comes from a table or a file (captions, labels, ImageIDs, paths, config values) goes through
:func:`mlc.report.page.esc`; numbers are formatted here. Cards are rendered one by one, so that
:mod:`mlc.report.build` can count their bytes against the size limit before it adds them."""

from __future__ import annotations

import base64
import math

from mlc.report.analysis import Item
from mlc.report.limits import MAX_CO_LABELS
from mlc.report.page import esc, page

SECTIONS = (("run", "Run"), ("metrics", "Metrics"), ("per-class", "Per class"), ("plots", "Plots"),
            ("errors", "Validation errors"), ("co-occurrence", "Label co-occurrence"), ("test", "Test predictions"),
            ("notes", "Notes"))


def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return esc(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return esc(v)


def kv_table(rows) -> str:
    return "<table class=\"kv\">" + "".join(f"<tr><td>{esc(k)}</td><td>{fmt(v)}</td></tr>" for k, v in rows) + \
        "</table>"


def _num(v) -> str:
    """A sortable cell: the shown number and its value for the table's sort."""
    key = -1 if isinstance(v, float) and math.isnan(v) else v
    return f"<td class=\"n\" data-v=\"{key}\">{fmt(v)}</td>"


def per_class_table(rows: list) -> str:
    if not rows:
        return "<p class=\"note\">No validation scores: no per-class table.</p>"
    head = "".join(f"<th>{h}</th>" for h in ("label", "F1", "precision", "recall", "AP", "support", "predicted",
                                             "threshold"))
    body = "".join(f"<tr><td>{esc(r['label'])}</td>{_num(r['f1'])}{_num(r['precision'])}{_num(r['recall'])}"
                   f"{_num(r['ap'])}{_num(r['support'])}{_num(r['predicted'])}<td>{esc(r['threshold'])}</td></tr>"
                   for r in rows)
    return (f"<table class=\"sortable\" id=\"per-class-table\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            "</table><p class=\"note\">On the validation images of the best epoch, with the run's threshold; AP "
            "is n/a for a label without a positive there. Click a header to sort.</p>")


def _chips(labels: list, idx: list, cls) -> str:
    return "".join(f"<span class=\"chip {cls(c)}\">{esc(labels[c])}</span>" for c in idx) or \
        "<span class=\"note\">none</span>"


def card(item: Item, labels: list, uri: str | None, rank: int, problem: str | None = None) -> str:
    """One image: thumbnail, ImageID, caption, true and predicted labels (missed and extra marked), top scores."""
    chosen = set(item.predicted) | set(item.truth or ())
    scores = " ".join("-1" if math.isnan(s) else f"{s:.4f}" for s in item.scores)
    img = (f"<img src=\"{uri}\" alt=\"{esc(item.image_id)}\" loading=\"eager\">" if uri else
           f"<div class=\"noimg\">{esc(problem or 'no image')}</div>")
    rows = []
    if item.truth is not None:
        truth, predicted = set(item.truth), set(item.predicted)
        rows.append("<div class=\"row\"><b>true</b>" +
                    _chips(labels, item.truth, lambda c: "hit" if c in predicted else "missed") + "</div>")
        rows.append("<div class=\"row\"><b>predicted</b>" +
                    _chips(labels, item.predicted, lambda c: "hit" if c in truth else "extra") + "</div>")
        if item.missed or item.extra:
            rows.append("<div class=\"row\"><b>wrong</b>" + "".join(
                f"<span class=\"chip missed\">missed {esc(labels[c])}</span>" for c in item.missed) + "".join(
                f"<span class=\"chip extra\">extra {esc(labels[c])}</span>" for c in item.extra) + "</div>")
        rows.append(f"<div class=\"row note\">F1 {item.f1:.2f}, loss {item.loss:.3f}</div>")
    else:
        rows.append("<div class=\"row\"><b>predicted</b>" + _chips(labels, item.predicted, lambda c: "pred") +
                    "</div>")
    bars = "".join(f"<div class=\"bar\"><span class=\"l\">{esc(labels[c])}</span><span class=\"b\" "
                   f"style=\"width:{max(1, round(s * 120))}px\"></span>{s:.3f}</div>" for c, s in item.top())
    if not item.readable:
        bars = "<div class=\"note\">unreadable: no scores</div>"
    caption = f"<div class=\"cap\">{esc(item.caption)}</div>" if item.caption else ""
    graded = f" data-f1=\"{item.f1:.4f}\" data-loss=\"{item.loss:.4f}\"" if item.truth is not None else ""
    return (f"<figure class=\"card\" data-id=\"{esc(item.image_id)}\" data-rank=\"{rank}\"{graded} "
            f"data-top=\"{item.top_score:.4f}\" "
            f"data-labels=\"{' '.join(str(c) for c in sorted(chosen))}\" data-scores=\"{scores}\">"
            f"{img}<figcaption><div class=\"id\">{esc(item.image_id)}</div>{caption}{''.join(rows)}{bars}"
            "</figcaption></figure>")


def toolbar(gallery_id: str, labels: list, graded: bool) -> str:
    options = "".join(f"<option value=\"{c}\">{esc(lab)}</option>" for c, lab in enumerate(labels))
    first = "worst first (F1, then loss)" if graded else "table order"
    return (f"<div class=\"toolbar\" data-for=\"{gallery_id}\"><label>label <select class=\"f-label\">"
            f"<option value=\"\">any</option>{options}</select></label><label>sort <select class=\"f-sort\">"
            f"<option value=\"rank\">{first}</option><option value=\"top-desc\">top score, highest first</option>"
            "<option value=\"top-asc\">top score, lowest first</option><option value=\"label-desc\">score of the "
            "chosen label, highest first</option></select></label><span class=\"f-count\"></span></div>")


def co_occurrence_table(co: dict | None, labels: list, confusions: list) -> str:
    if co is None:
        return "<p class=\"note\">No validation scores: no co-occurrence.</p>"
    shown = sorted(range(len(labels)), key=lambda c: (-int(co["support"][c]), c))[:MAX_CO_LABELS]
    shown.sort()
    head = "".join(f"<th>{esc(labels[a])}</th>" for a in shown)
    rows = []
    for b in shown:
        lab, n = labels[b], int(co["support"][b])
        cells = []
        for a in shown:
            both, wrong = int(co["both"][b, a]), int(co["wrong"][b, a])
            share = both / n if n else 0.0
            tint = f"rgba({'46,125,50' if a == b else '198,40,40'},{0.08 + 0.8 * share:.2f})" if both else "#fff"
            cells.append(f"<td class=\"n\" style=\"background:{tint}\" title=\"{esc(labels[a])} predicted on {both} "
                         f"of {n} images where {esc(lab)} is true ({wrong} of them without {esc(labels[a])})\">"
                         f"{share:.2f}</td>" if n else "<td class=\"n\">-</td>")
        rows.append(f"<tr><th>{esc(lab)} ({n})</th>{''.join(cells)}</tr>")
    top = "".join(f"<li>{esc(labels[a])} predicted without being true on {w} of the {n} images where "
                  f"{esc(labels[b])} is true</li>" for b, a, w, n in confusions)
    cut = f" The {len(shown)} labels with the most validation images of {len(labels)}." \
        if len(shown) < len(labels) else ""
    return (f"<p>Row: the true label (its validation images); column: the predicted label. A cell is the share of "
            f"the row's images on which the column's label is predicted: the diagonal is each label's recall, the "
            f"rest what the model predicts beside (or instead of) it.{cut}</p>"
            f"<table class=\"heat\" id=\"co-table\"><thead><tr><th>true \\ predicted</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
            f"<h3>Most frequent wrong labels beside a true one</h3><ol id=\"confusions\">{top or '<li>none</li>'}</ol>")


def plots_html(plots: list) -> str:
    if not plots:
        return "<p class=\"note\">No plots.</p>"
    return "<div class=\"plots\">" + "".join(
        f"<figure><img src=\"data:image/png;base64,{base64.b64encode(blob).decode('ascii')}\" alt=\"{esc(name)}\">"
        f"<figcaption>{esc(name)}</figcaption></figure>" for name, blob in plots) + "</div>"


def render(report, error_cards: list, test_cards: list, confusions: list, thumbs_note: str) -> str:
    """The page of ``report`` with the cards chosen to fit."""
    labels = report.labels
    nav = "<nav>" + "".join(f"<a href=\"#{sid}\">{name}</a>" for sid, name in SECTIONS) + "</nav>"
    config = "<details><summary>every setting (config)</summary>" + kv_table(sorted(report.config.items())) + \
        "</details>"
    n_wrong = len(report.errors)
    errors = (f"<p id=\"errors-count\">{len(error_cards)} shown: the worst of the {n_wrong} validation images whose "
              f"predicted label set is wrong (of {report.n_val} scored), by their own F1 (lowest first), then their "
              f"loss. <span class=\"chip missed\">missed</span> a true label not predicted, <span class=\"chip "
              f"extra\">extra</span> a label predicted but not true.</p>" + toolbar("errors-gallery", labels, True) +
              f"<div class=\"gallery\" id=\"errors-gallery\">{''.join(error_cards)}</div>")
    test = (f"<p id=\"test-count\">{len(test_cards)} of the {report.n_test} predicted images, spread evenly over "
            f"the table.</p>" + toolbar("test-gallery", labels, False) +
            f"<div class=\"gallery\" id=\"test-gallery\">{''.join(test_cards)}</div>")
    notes = "".join(f"<li>{esc(n)}</li>" for n in [thumbs_note] + report.notes)
    body = (f"<h1>mlc report: {esc(report.kind)}</h1><p class=\"note\">{esc(report.folder)}</p>{nav}"
            f"<section id=\"run\"><h2>Run</h2>{kv_table(report.identity)}{config}</section>"
            f"<section id=\"metrics\"><h2>Metrics of the best epoch</h2>{kv_table(report.metrics)}</section>"
            f"<section id=\"per-class\"><h2>Per class</h2>{per_class_table(report.per_class)}</section>"
            f"<section id=\"plots\"><h2>Plots</h2>{plots_html(report.plots)}</section>"
            f"<section id=\"errors\"><h2>Validation errors</h2>{errors}</section>"
            f"<section id=\"co-occurrence\"><h2>Label co-occurrence</h2>"
            f"{co_occurrence_table(report.co, labels, confusions)}</section>"
            f"<section id=\"test\"><h2>Test predictions</h2>{test}</section>"
            f"<section id=\"notes\"><h2>Notes</h2><ul>{notes}</ul></section>")
    return page(f"mlc report: {report.folder}", body)
