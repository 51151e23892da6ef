"""report.html (mlc.report): what it holds and counts, checked against the run's own files and scikit-learn; escaping
of untrusted captions and labels; the size limit; training, prediction and jobs/report.py writing it; a report
that fails being a warning; a real browser opening it (headless Chromium, skipped where there is none)."""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
import os
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score

from mlc.config import TrainConfig
from mlc.data.demo import make_demo_dataset
from mlc.data.table import read_table
from mlc.eval.thresholds import ThresholdChoice
from mlc.report import analysis, page
from mlc.report.build import try_write_report, write_report
from mlc.report.html import SECTIONS
from mlc.train.driver import fit

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "comp5329"
XSS = "<script>alert(1)</script>"
# Two of the demo's labels renamed to markup: labels come from the table as much as captions do.
EVIL_LABELS = {"1": "<i>x</i>", "3": 'q"onmouseover="alert(3)'}


# --- the page, parsed -------------------------------------------------------------------------------------------


class Page(HTMLParser):
    """Every element as (tag, attrs, ids of the elements around it), each script's text, each gallery's cards (their
    attributes and image sources) and each table's cells (attributes and text), by id."""

    VOID = ("img", "meta", "input", "br", "hr", "link")

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements, self.scripts, self.cards, self.tables = [], [], {}, {}
        self._stack, self._script, self._card, self._table, self._cell = [], False, None, None, None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a, [x for x in self._stack if x]))
        if tag == "figure" and "card" in a.get("class", ""):
            gallery = next(x for x in reversed(self._stack) if x and x.endswith("-gallery"))
            self._card = {**a, "imgs": []}
            self.cards.setdefault(gallery, []).append(self._card)
        elif tag == "img" and self._card is not None:
            self._card["imgs"].append(a["src"])
        elif tag == "table" and a.get("id"):
            self._table = self.tables.setdefault(a["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = [a, ""]
            self._table[-1].append(self._cell)
        if tag not in self.VOID:
            self._stack.append(a.get("id"))
        self._script = tag == "script"
        if self._script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag not in self.VOID and self._stack:
            self._stack.pop()
        if tag == "figure":
            self._card = None
        elif tag == "table":
            self._table = None
        elif tag in ("td", "th"):
            self._cell = None
        self._script = False

    def handle_data(self, data):
        if self._script:
            self.scripts[-1] += data
        if self._cell is not None:
            self._cell[1] += data

    def by_id(self, element_id):
        return next(e for e in self.elements if e[1].get("id") == element_id)

    def inside(self, element_id, tag):
        return [e for e in self.elements if e[0] == tag and element_id in e[2]]


def jpeg_of(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    img.load()
    assert img.format == "JPEG"
    return img


def val_scores(run: Path):
    """The best epoch's validation scores as the run saved them, and its threshold."""
    meta = json.loads((run / "best" / "meta.json").read_text())
    labels = meta["labels"]
    table = pd.read_csv(run / "best" / "val_probabilities.csv", dtype={"ImageID": str})
    probs = table[labels].to_numpy(dtype=np.float64)
    ok = ~np.isnan(probs).any(axis=1)
    truth = table[[f"true_{c}" for c in labels]].to_numpy()[ok].astype(bool)
    return table.ImageID[ok].tolist(), truth, probs[ok], ThresholdChoice.from_dict(meta["threshold"]), labels


# --- runs ---------------------------------------------------------------------------------------------------------


def _demo_with_markup(root: Path) -> Path:
    """The demo set with every caption prefixed by a script tag and two labels renamed to markup."""
    src = Path(make_demo_dataset(str(root / "demo"), n_train=48, n_test=8, image_size=48, seed=5))
    out = root / "data"
    shutil.copytree(src / "data", out / "data")
    for name, labelled in (("train.csv", True), ("test.csv", False)):
        df = read_table(str(src / name))
        rows = ["ImageID,Labels,Caption" if labelled else "ImageID,Caption"]
        for r in df.itertuples():
            caption = f'"{XSS} {r.Caption}"'
            labels = " ".join(EVIL_LABELS.get(x, x) for x in r.Labels) if labelled else None
            rows.append(f"{r.ImageID},{labels},{caption}" if labelled else f"{r.ImageID},{caption}")
        (out / name).write_text("\n".join(rows) + "\n")
    return out


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), output=str(out), weights="none", image_size=32, epochs=1, batch_size=16,
                unfrozen_depth=1, dropout=0.0, loader_workers=0, val_fraction=0.3, amp="off", inputs="image")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A tiny image run on the demo set (through the decode-once store), with markup in captions and labels."""
    root = tmp_path_factory.mktemp("report-demo")
    data = _demo_with_markup(root)
    logs = []
    summary = fit(_cfg(data, root / "run", unfrozen_depth=0), log=logs.append, progress=False)  # the head only
    return {"run": root / "run", "data": data, "logs": logs, "summary": summary}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """The 2,008 real labelled rows whose image is present (and 24 real test rows), a caption network: seconds
    to train, and its report shows the real images, decoded from the image folder (no store: it reads none)."""
    if not (REAL / "images").is_dir():
        pytest.skip(f"real data not found at {REAL}")
    root = tmp_path_factory.mktemp("report-real")
    present = set(os.listdir(REAL / "images"))
    train = read_table(str(REAL / "train.csv"))
    train = train[train.ImageID.isin(present)]
    test = read_table(str(REAL / "test.csv"))
    test = test[test.ImageID.isin(present)].head(24)
    (root / "train.csv").write_text("ImageID,Labels,Caption\n" + "".join(
        f'{r.ImageID},{" ".join(r.Labels)},"{r.Caption}"\n' for r in train.itertuples()))
    (root / "test.csv").write_text("ImageID,Caption\n" + "".join(f'{r.ImageID},"{r.Caption}"\n'
                                                                for r in test.itertuples()))
    cfg = _cfg(REAL, root / "run", images="images", train_csv=str(root / "train.csv"),
               test_csv=str(root / "test.csv"), inputs="caption", epochs=1, batch_size=64, val_fraction=0.2,
               lr=1e-2)
    logs = []
    fit(cfg, log=logs.append, progress=False)
    return {"run": root / "run", "rows": len(train), "logs": logs, "cfg": cfg}


# --- what the page holds ------------------------------------------------------------------------------------------


def test_a_training_run_writes_a_report_with_every_section_and_the_runs_counts(demo_run):
    run = demo_run["run"]
    text = (run / "report.html").read_text()
    assert demo_run["summary"]["report"] == str(run / "report.html")
    assert any(line.startswith(f"wrote {run / 'report.html'}") for line in demo_run["logs"])
    doc = Page(text)
    for sid, _ in SECTIONS:
        assert doc.by_id(sid)[0] == "section", sid
    ids, truth, probs, choice, labels = val_scores(run)
    pred = choice.apply(probs)
    wrong = [i for i, t, p in zip(ids, truth, pred) if (t != p).any()]
    cards = doc.cards["errors-gallery"]
    assert 0 < len(cards) == len(wrong)  # every error fits under 5 MB here
    assert {c["data-id"] for c in cards} == set(wrong)
    assert f"the worst of the {len(wrong)} validation images" in text and f"(of {len(ids)} scored)" in text
    # Worst first: by the image's own F1 (scikit-learn's, row by row), then by its loss.
    row = {i: k for k, i in enumerate(ids)}
    f1 = [f1_score(truth[row[c["data-id"]]], pred[row[c["data-id"]]], zero_division=1.0) for c in cards]
    assert [float(c["data-f1"]) for c in cards] == pytest.approx(f1, abs=1e-4)
    keys = [(float(c["data-f1"]), -float(c["data-loss"])) for c in cards]
    assert keys == sorted(keys)
    # The per-class table: one row per label, F1 and AP as scikit-learn computes them, support as counted.
    table = doc.tables["per-class-table"]
    assert [cell[1] for cell in table[0]][:2] == ["label", "F1"] and len(table) == len(labels) + 1
    assert [row[0][1] for row in table[1:]] == labels  # the label names as text (two of them markup)
    html_f1 = [float(row[1][0]["data-v"]) for row in table[1:]]
    assert html_f1 == pytest.approx(f1_score(truth, pred, average=None, zero_division=1.0), abs=1e-9)
    metrics = json.loads((run / "metrics.json").read_text())
    assert html_f1 == pytest.approx(metrics["epochs"][-1]["f1_per_class"], abs=1e-9)  # what training reported
    rows = analysis.per_class_rows(labels, truth, probs, pred, choice)
    for c, r in enumerate(rows):
        assert r["support"] == truth[:, c].sum()
        if truth[:, c].any():
            assert r["ap"] == pytest.approx(average_precision_score(truth[:, c], probs[:, c]), abs=1e-9)
    # Co-occurrence: a row per label; the test sample: every test row of this small set.
    co = doc.tables["co-table"]
    assert len(co) == len(labels) + 1
    b, a = 0, 0  # the first label's row and column: images where it is true, and where it is predicted too
    n = truth[:, b].sum()
    assert co[1][0][1] == f"{labels[b]} ({n})" and float(co[1][1 + a][1]) == pytest.approx(
        (truth[:, b] & pred[:, a]).sum() / n, abs=5e-3)
    assert len(doc.cards["test-gallery"]) == len(read_table(str(run / "predictions.csv")))
    assert len([e for e in doc.inside("plots", "img")]) == 4  # the run's four plots


def test_the_run_section_names_the_checkpoint_its_sha256_and_the_best_epochs_metrics(demo_run):
    import hashlib
    run = demo_run["run"]
    text = (run / "report.html").read_text()
    meta = json.loads((run / "best" / "meta.json").read_text())
    sha = hashlib.sha256((run / "best" / "model.pt").read_bytes()).hexdigest()
    for key, value in (("model", html_lib.escape(str(run / "best"))), ("epoch", meta["epoch"]),
                       ("model sha256", f"{sha} (matches model.pt)"), ("inputs", "image"),
                       ("data", html_lib.escape(str(demo_run["data"])))):
        assert f"<tr><td>{key}</td><td>{value}</td></tr>" in text, key
    metrics = json.loads((run / "metrics.json").read_text())
    best = next(e for e in metrics["epochs"] if e["epoch"] == metrics["best_epoch"])
    for key, name in (("f1_samples", "F1 (samples)"), ("map", "mAP"), ("val_loss", "validation loss")):
        assert f"<tr><td>{name}</td><td>{best[key]:.4f}</td></tr>" in text, name
    config = text.split("every setting (config)</summary>")[1].split("</details>")[0]  # every setting, by name
    assert "<tr><td>batch_size</td><td>16</td></tr>" in config and "<tr><td>unfrozen_depth</td><td>0</td></tr>" in config


def test_thumbnails_come_from_the_runs_store_and_are_small_jpegs(demo_run):
    text = (demo_run["run"] / "report.html").read_text()
    doc = Page(text)
    text = html_lib.unescape(text)
    cards = doc.cards["errors-gallery"] + doc.cards["test-gallery"]
    assert all(len(c["imgs"]) == 1 for c in cards)
    for c in cards:
        img = jpeg_of(c["imgs"][0])
        assert max(img.size) <= 112 and len(c["imgs"][0]) < 12_000
    n_err, n_test = len(doc.cards["errors-gallery"]), len(doc.cards["test-gallery"])
    # Validation images from the store training filled (48 px slots at --image-size 32); test images are not in it.
    assert f"Thumbnails: {n_test} from the image folder, {n_err} from the run's decode-once store" in text
    # The store did not outlive the run.
    from mlc.data.store import find
    from mlc.data.store_choice import store_keys
    from mlc.data.run_data import DataPaths, image_urls
    urls = image_urls(DataPaths.resolve(str(demo_run["data"])).images,
                      read_table(str(demo_run["data"] / "train.csv")).ImageID)
    assert all(find(k) is None for k in store_keys(urls, 32)[0].values())


def test_captions_and_labels_from_the_tables_are_escaped(demo_run):
    text = (demo_run["run"] / "report.html").read_text()
    doc = Page(text)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and XSS not in text
    assert [e[0] for e in doc.elements].count("script") == 1 and doc.scripts == [page.SCRIPT]
    assert "i" not in [e[0] for e in doc.elements]  # the label <i>x</i> is text
    assert "&lt;i&gt;x&lt;/i&gt;" in text and "q&quot;onmouseover=&quot;alert(3)" in text
    assert not any(k.startswith("on") for _, a, _ in doc.elements for k in a)  # no handler attribute anywhere
    # Self-contained: every image is a data URI, every link an anchor; the policy admits only the page's script.
    assert all(a["src"].startswith("data:") for t, a, _ in doc.elements if t == "img")
    assert all(a["href"].startswith("#") for t, a, _ in doc.elements if t == "a")
    policy = next(a["content"] for t, a, _ in doc.elements if t == "meta" and a.get("http-equiv"))
    assert "default-src 'none'" in policy and f"'sha256-{page.SCRIPT_HASH}'" in policy
    assert not re.search(r"https?://", text.split("<body>")[0])


def test_the_size_limit_holds_and_the_worst_errors_are_kept(demo_run, tmp_path):
    run = demo_run["run"]
    full = Page((run / "report.html").read_text()).cards["errors-gallery"]
    small = tmp_path / "small.html"
    no_cards = write_report(str(run), output=str(small), max_errors=0, max_test=0, log=lambda *_: None)["bytes"]
    limit = no_cards + 2_000 + 6 * 3_000  # room for a few cards only
    out = write_report(str(run), output=str(small), max_bytes=limit, log=lambda *_: None)
    assert small.stat().st_size == out["bytes"] <= limit
    shown = Page(small.read_text()).cards["errors-gallery"]
    assert 0 < len(shown) < len(full) and out["errors"] == len(shown)
    assert [c["data-id"] for c in shown] == [c["data-id"] for c in full[:len(shown)]]  # a prefix: the worst
    assert f"{len(shown)} shown: the worst of the {len(full)}" in small.read_text()


def test_a_report_that_fails_is_a_warning_and_leaves_no_stale_report(demo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_run["run"], run, ignore=shutil.ignore_patterns("checkpoint", "tensorboard"))
    before = sorted(p.name for p in run.iterdir())
    logs = []
    assert try_write_report(str(run), max_bytes=1_000, log=logs.append) is None  # too small for any report
    assert len(logs) == 1 and logs[0].startswith("warning: report.html not written (ValueError: the report without")
    assert "removed the earlier report.html" in logs[0] and f"jobs/report.py --run {run}" in logs[0]
    assert sorted(p.name for p in run.iterdir()) == [n for n in before if n != "report.html"]


def test_a_finished_run_resumed_writes_outputs_even_when_its_report_fails(real_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(real_run["run"], run)
    import mlc.train.driver as driver
    monkeypatch.setattr(driver, "try_write_report", lambda url, **kw: try_write_report(url, max_bytes=1_000, **kw))
    logs = []
    summary = fit(real_run["cfg"].replace(output=str(run)), log=logs.append, progress=False)  # outputs only
    assert summary["report"] is None and not (run / "report.html").exists()
    assert any(line.startswith("warning: report.html not written") for line in logs)
    assert json.loads((run / "metrics.json").read_text())["complete"] is True
    assert (run / "predictions.csv").is_file()


def test_prediction_writes_a_report_of_its_own_predictions(demo_run, tmp_path):
    import mlc
    out = tmp_path / "pred"
    ids = read_table(str(demo_run["data"] / "test.csv")).ImageID.tolist()[:5]
    (tmp_path / "ids.csv").write_text("ImageID\n" + "".join(f"{i}\n" for i in ids))
    summary = mlc.predict(str(demo_run["run"]), output=str(out), ids_csv=str(tmp_path / "ids.csv"),
                          loader_workers=0, progress=False, log=lambda *_: None)
    assert summary["report"] == str(out / "report.html")
    text = (out / "report.html").read_text()
    doc = Page(text)
    assert [c["data-id"] for c in doc.cards["test-gallery"]] == ids  # this prediction's rows, in order
    assert "mlc report: prediction" in text and str(demo_run["run"] / "best") in text
    assert len(doc.cards["errors-gallery"]) > 0  # the model's validation errors, from its best/
    assert len(doc.inside("plots", "img")) == 3  # drawn from the validation scores: no history without the run
    assert (out / "predict_config.json").is_file()


def test_a_sweeps_prediction_reports_its_best_trial_and_the_sweep_plot(demo_run, tmp_path):
    """What jobs/tune.py leaves (best/, best_config.json, plots/sweep.png) and then does: predict from best/ into
    the sweep's folder (mlc.distributed.tune.summarize)."""
    import mlc
    sweep = tmp_path / "sweep"
    shutil.copytree(demo_run["run"] / "best", sweep / "best")
    (sweep / "best_config.json").write_text(json.dumps({"trial": "t0", "checkpoint": str(sweep / "best")}))
    (sweep / "plots").mkdir()
    sweep_png = (demo_run["run"] / "plots" / "history.png").read_bytes()  # a real PNG stands in for the sweep's
    (sweep / "plots" / "sweep.png").write_bytes(sweep_png)
    summary = mlc.predict(str(sweep / "best"), output=str(sweep), loader_workers=0, progress=False,
                          log=lambda *_: None)
    assert summary["report"] == str(sweep / "report.html")
    text = (sweep / "report.html").read_text()
    doc = Page(text)
    assert "<h1>mlc report: sweep&#x27;s best trial</h1>" in text
    srcs = [e[1]["src"] for e in doc.inside("plots", "img")]
    assert len(srcs) == 4 and base64.b64decode(srcs[-1].split(",", 1)[1]) == sweep_png  # 3 drawn, then sweep.png
    assert len(doc.cards["errors-gallery"]) > 0
    assert len(doc.cards["test-gallery"]) == len(read_table(str(sweep / "predictions.csv")))


def test_jobs_report_rebuilds_a_report_and_refuses_a_folder_without_a_run(demo_run, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "jobs"))
    import report as report_job
    from mlc.cli import run_job
    out = tmp_path / "again.html"
    with pytest.raises(SystemExit) as done:
        run_job(report_job.main, report_job.get_args_parser(),
                ["--run", str(demo_run["run"]), "--output", str(out), "--test-sample", "3", "--quiet"])
    assert done.value.code == 0
    assert len(Page(out.read_text()).cards["test-gallery"]) == 3
    # Built after the run: its store is gone, and the note says why the thumbnails came from the image folder.
    assert "Thumbnails of a report built after its run are decoded again" in html_lib.unescape(out.read_text())
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    for folder in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(SystemExit) as done:
            run_job(report_job.main, report_job.get_args_parser(), ["--run", str(folder)])
        assert done.value.code == 3
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(folder) in err and len(err.splitlines()) == 1


def test_a_run_on_the_real_images_reports_them(real_run):
    run = real_run["run"]
    text = (run / "report.html").read_text()
    doc = Page(text)
    ids, truth, probs, choice, labels = val_scores(run)
    assert len(ids) == int(np.ceil(0.2 * real_run["rows"])) and len(labels) == 18
    wrong = int((truth != choice.apply(probs)).any(axis=1).sum())
    cards = doc.cards["errors-gallery"]
    assert 0 < len(cards) == min(wrong, 200) and len(doc.cards["test-gallery"]) == 24
    assert f"the worst of the {wrong} validation images" in text
    assert len(text.encode()) <= 5_000_000
    # The network read no image, so there was no store: every thumbnail is a real image decoded again.
    assert f"Thumbnails: {len(cards) + 24} from the image folder" in text and "No store of this run" in text
    sides = [max(jpeg_of(c["imgs"][0]).size) for c in cards]
    assert max(sides) == 112 and all(s <= 112 for s in sides)  # real images (up to 320 px) shrunk to fit
    captions = dict(zip(*[read_table(str(run.parent / "train.csv"))[k] for k in ("ImageID", "Caption")]))
    first = cards[0]["data-id"]
    assert html_lib.escape(captions[first], quote=True) in text


# --- a real browser -----------------------------------------------------------------------------------------------


def test_chromium_opens_the_report_without_errors_and_shows_the_thumbnails(demo_run, tmp_path):
    from browser import Browser, chromium
    if chromium() is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it as root)")
    report = demo_run["run"] / "report.html"
    doc = Page(report.read_text())
    with Browser() as b:
        b.open(report.as_uri())
        assert b.evaluate("document.body.getAttribute('data-ready')") == "1"  # the script ran under the policy
        shown = b.evaluate("""Array.prototype.filter.call(document.querySelectorAll('#errors-gallery img'),
            function(i){var r=i.getBoundingClientRect();return i.complete&&i.naturalWidth>0&&r.width>0&&r.height>0;
            }).length""")
        assert shown == len(doc.cards["errors-gallery"]) > 0
        b.evaluate("document.getElementById('errors').scrollIntoView()")
        png = b.screenshot()
        # The label filter: pick the first label of the first card; the shown cards are those it is true or
        # predicted on.
        label = doc.cards["errors-gallery"][0]["data-labels"].split()[0]
        want = sum(label in c["data-labels"].split() for c in doc.cards["errors-gallery"])
        visible = b.evaluate(f"""(function(){{var bar=document.querySelector('.toolbar[data-for=errors-gallery]');
            bar.querySelector('.f-label').value='{label}';bar.querySelector('.f-sort').value='top-desc';
            bar.dispatchEvent(new Event('change'));
            return Array.prototype.filter.call(document.querySelectorAll('#errors-gallery .card'),
              function(c){{return !c.hidden;}}).map(function(c){{return parseFloat(c.getAttribute('data-top'));}});
            }})()""")
        assert len(visible) == want and visible == sorted(visible, reverse=True)
        assert b.evaluate("document.querySelector('.toolbar .f-count').textContent") == \
            f"{want} of {len(doc.cards['errors-gallery'])} shown"
        assert b.errors == []
    (tmp_path / "report.png").write_bytes(png)
    shot = Image.open(io.BytesIO(png))
    assert shot.size == (1300, 1000) and len(shot.convert("RGB").getcolors(1 << 20)) > 500  # not a blank page


# --- the rows, unit by unit ---------------------------------------------------------------------------------------


def test_f1_per_sample_is_scikit_learns_row_by_row():
    from mlc.eval.metrics import f1_per_sample
    rng = np.random.default_rng(1)
    t, p = rng.random((60, 7)) < 0.3, rng.random((60, 7)) < 0.3
    t[0], p[0] = False, False  # neither: 1
    t[1], p[1] = True, False  # nothing predicted: 0
    want = [f1_score(a, b, zero_division=1.0) for a, b in zip(t, p)]
    assert f1_per_sample(t, p) == pytest.approx(want, abs=1e-12)


def test_worst_errors_and_co_occurrence_against_brute_force():
    rng = np.random.default_rng(2)
    n, c = 80, 5
    truth = rng.random((n, c)) < 0.35
    probs = np.clip(truth * 0.4 + rng.random((n, c)) * 0.6, 0, 1)
    pred = probs >= 0.5
    ids = [f"{i}.jpg" for i in range(n)]
    items = analysis.worst_errors(ids, [None] * n, truth, probs, pred)
    assert {it.image_id for it in items} == {ids[i] for i in range(n) if (truth[i] != pred[i]).any()}
    loss = analysis.per_image_loss(truth, probs)
    keys = [(it.f1, -it.loss) for it in items]
    assert keys == sorted(keys)
    for it in items[:10]:
        i = ids.index(it.image_id)
        assert it.loss == pytest.approx(-np.mean([np.log(probs[i, k]) if truth[i, k] else np.log(1 - probs[i, k])
                                                  for k in range(c)]), abs=1e-9) == loss[i]
        assert set(it.missed) == {k for k in range(c) if truth[i, k] and not pred[i, k]}
        assert set(it.extra) == {k for k in range(c) if pred[i, k] and not truth[i, k]}
    co = analysis.co_occurrence(truth, pred)
    for b in range(c):
        for a in range(c):
            assert co["both"][b, a] == sum(truth[i, b] and pred[i, a] for i in range(n))
            assert co["wrong"][b, a] == sum(truth[i, b] and pred[i, a] and not truth[i, a] for i in range(n))
    top = analysis.top_confusions(co, k=3)
    assert all(b != a for b, a, _, _ in top) and [w for _, _, w, _ in top] == sorted([w for *_, w, _ in top],
                                                                                     reverse=True)


def test_the_test_sample_spans_the_table():
    probs = np.random.default_rng(3).random((100, 4))
    items = analysis.test_sample([f"{i}" for i in range(100)], [None] * 100, probs, [[0]] * 100, 5)
    assert [it.image_id for it in items] == ["0", "25", "50", "74", "99"]
    assert analysis.test_sample(["a"], [None], probs[:1], [[]], 5)[0].image_id == "a"
    assert analysis.test_sample([], [], probs[:0], [], 5) == []


def test_the_co_occurrence_table_keeps_the_most_frequent_labels_of_a_large_set():
    from mlc.report.html import co_occurrence_table
    from mlc.report.limits import MAX_CO_LABELS
    rng = np.random.default_rng(4)
    c = MAX_CO_LABELS + 10
    truth = rng.random((300, c)) < np.linspace(0.02, 0.5, c)  # later labels are more frequent
    co = analysis.co_occurrence(truth, rng.random((300, c)) < 0.2)
    labels = [f"L{k}" for k in range(c)]
    doc = Page(co_occurrence_table(co, labels, analysis.top_confusions(co)))
    rows = doc.tables["co-table"]
    assert len(rows) == MAX_CO_LABELS + 1 and len(rows[0]) == MAX_CO_LABELS + 1
    kept = [r[0][1].split(" ")[0] for r in rows[1:]]
    support = truth.sum(axis=0)
    assert sorted(support[[labels.index(k) for k in kept]]) == sorted(support)[-MAX_CO_LABELS:]


def test_a_store_is_looked_for_only_when_one_is_on_this_node(tmp_path, monkeypatch):
    from mlc.data.store import any_present
    from mlc.report.thumbs import open_thumbnails
    mem, disk = tmp_path / "mem", tmp_path / "disk"
    monkeypatch.setenv("MLC_STORE_MEMORY_DIR", str(mem))
    monkeypatch.setenv("MLC_STORE_DIR", str(disk))
    assert not any_present()  # neither root exists
    disk.mkdir()
    (disk / ".tmp-abc").mkdir()  # a store still being made is not one
    assert not any_present()
    # No store here: the thumbnails read the image folder, and the run's key (a stat of every image) is never made.
    import mlc.report.thumbs as thumbs
    monkeypatch.setattr(thumbs, "store_keys", lambda *a: pytest.fail("store_keys called with no store present"))
    with open_thumbnails(["/nowhere/a.jpg"], 32, ["a.jpg"]) as t:
        assert t.store is None
    (disk / "0123abcd").mkdir()
    assert any_present()
