"""What a report shows, read back from the files a run or a prediction wrote: :func:`gather` -> :class:`Report`.

The folder is a training run's (local or Ray: metrics.json, best/, plots/, predictions.csv, probabilities.csv), a
prediction's (predictions.csv, probabilities.csv, predict_config.json naming the checkpoint) or a sweep's (best/ and
its prediction). The model's identity and validation scores come from its model folder (best/ or an epoch's:
meta.json, labels.json, val_probabilities.csv); the captions from the tables, read again unless the run that just
trained hands them over. Only the report's own rows are built here; :mod:`mlc.report.html` writes them.
"""

from __future__ import annotations

import datetime
import io
import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mlc.config import TrainConfig, uses_images
from mlc.data.run_data import DataPaths, image_urls
from mlc.data.table import read_ids_captions, read_table
from mlc.eval import plots as plotting
from mlc.eval.thresholds import ThresholdChoice, select_threshold
from mlc.io import storage
from mlc.model.checkpoint import read_meta
from mlc.report import analysis

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A plot is 20-80 KB; a file far larger than that in plots/ is not one of ours, and would crowd out the images.
MAX_PLOT_BYTES = 1_000_000
PLOT_ORDER = ("history", "per_class_f1", "threshold", "pr_curves", "sweep")
METRIC_NAMES = (("f1_samples", "F1 (samples)"), ("f1_micro", "F1 (micro)"), ("f1_macro", "F1 (macro)"),
                ("precision_samples", "precision (samples)"), ("recall_samples", "recall (samples)"),
                ("precision_micro", "precision (micro)"), ("recall_micro", "recall (micro)"),
                ("precision_macro", "precision (macro)"), ("recall_macro", "recall (macro)"), ("map", "mAP"),
                ("val_loss", "validation loss"), ("val_images", "validation images"))


@dataclass
class Report:
    folder: str
    kind: str
    labels: list
    identity: list = field(default_factory=list)    # (name, value) rows
    config: dict = field(default_factory=dict)
    metrics: list = field(default_factory=list)     # (name, value) rows of the best epoch
    per_class: list = field(default_factory=list)   # analysis.per_class_rows
    plots: list = field(default_factory=list)       # (name, PNG bytes)
    errors: list = field(default_factory=list)      # analysis.Item, worst first: every candidate
    n_val: int = 0
    co: dict | None = None
    test: list = field(default_factory=list)        # analysis.Item: the sample's candidates
    n_test: int = 0
    images: dict = field(default_factory=dict)      # "validation" / "test" -> the image folder
    notes: list = field(default_factory=list)
    store_lookup: tuple | None = None               # (urls, image_size, ImageIDs, pack key) of the labelled rows
    by_run: bool = False                            # built by the run that just trained (its store may be here)


def gather(folder: str, *, model: str | None = None, predicted: dict | None = None, data=None,
           max_test: int = 60) -> Report:
    """The report of ``folder``. ``model``: the checkpoint its predictions came from (default: the one its
    predict_config.json names, else the folder's own best/); ``predicted``: the prediction's ``data``, ``ids`` and
    ``images`` as predict_config.json records them (default: its own, else the training's test table); ``data``:
    the :class:`mlc.data.run_data.RunData` of the run that just trained (its tables, and its store is looked up);
    ``max_test``: test rows sampled."""
    folder = str(folder).rstrip("/")
    if model is None:
        pconf = _read_json(storage.join(folder, "predict_config.json"))
        if pconf is not None:
            model, predicted = pconf["predict"]["checkpoint"], predicted or pconf["predict"]
    mfolder, vocab, meta = read_meta(model or folder)
    cfg = TrainConfig.from_dict(meta["config"])
    run = _run_metrics(folder, mfolder)
    train_paths = data.paths if data is not None else _paths(cfg)
    test_csv, test_images = _predicted_table(cfg, predicted, train_paths)
    kind = "training run" if run is not None else "sweep's best trial" \
        if storage.exists(storage.join(folder, "best_config.json")) else "prediction"
    report = Report(folder, kind, list(vocab.labels), config=cfg.to_dict(), by_run=data is not None,
                    images={"validation": train_paths.images, "test": test_images})
    report.identity = _identity(folder, kind, mfolder, meta, cfg, run, train_paths, test_csv)
    report.metrics = _metrics(run, meta)
    val = _validation(report, mfolder, ThresholdChoice.from_dict(meta["threshold"]), train_paths, data)
    if data is not None and uses_images(cfg.inputs) and cfg.store != "off":
        key = data.packed.pack.manifest["source"]["key"] if data.packed is not None else None
        report.store_lookup = (data.urls, cfg.image_size, data.train_df.ImageID.tolist(), key)
    _test(report, folder, test_csv, data.test_df if data is not None and predicted is None else None, max_test)
    report.plots = _plots(folder, run is not None, val, report.labels, meta, report.notes)
    return report


def _read_json(url: str):
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def _run_metrics(folder: str, mfolder: str) -> dict | None:
    """metrics.json of ``folder`` when it describes the model in ``mfolder`` (the folder's own best/)."""
    if mfolder.rstrip("/") != storage.join(folder, "best"):
        return None
    return _read_json(storage.join(folder, "metrics.json"))


def _paths(cfg: TrainConfig) -> DataPaths:
    return DataPaths.resolve(cfg.data or "", cfg.images, cfg.train_csv, cfg.test_csv)


def _predicted_table(cfg: TrainConfig, predicted: dict | None, train_paths: DataPaths) -> tuple[str, str]:
    """The table the folder's predictions.csv predicted and its image folder."""
    if predicted is None:
        return train_paths.test_csv, train_paths.images
    images = predicted.get("images")
    paths = DataPaths.resolve(predicted.get("data") or cfg.data or "", images if images is not None else cfg.images,
                              test_csv=predicted.get("ids"))
    return paths.test_csv, paths.images


def _identity(folder, kind, mfolder, meta, cfg, run, paths, test_csv) -> list:
    ok = meta.get("model_file_ok")
    sha = meta.get("model_sha256") or "not recorded"
    sha += {True: " (matches model.pt)", False: " (model.pt does NOT match it: an interrupted write?)",
            None: ""}[ok]
    choice = meta["threshold"]
    rule = "per class (see the table)" if choice["strategy"] == "per_class" else f"{choice['value']:g}"
    rows = [("folder", folder), ("report of", f"a {kind}"),
            ("model", mfolder), ("epoch", meta.get("epoch")), ("model sha256", sha), ("inputs", cfg.inputs),
            ("image size", f"{cfg.image_size} px"), ("labels", f"{len(meta['labels'])}: {' '.join(meta['labels'])}"),
            ("threshold", f"{choice['strategy']} {rule}"), ("data", cfg.data), ("images", paths.images),
            ("training table", paths.train_csv), ("predicted table", test_csv)]
    if run is not None:
        rows += [("run complete", "yes" if run.get("complete") else "no (metrics.json says complete: false)"),
                 ("trained on", f"{run.get('device', '?')}, precision {run.get('amp', '?')}, "
                                f"{run.get('seconds', float('nan')):.0f} s, best epoch {run.get('best_epoch')} of "
                                f"{len(run.get('epochs', []))}"),
                 ("skipped images", run.get("skipped_images", 0))]
    for name in ("config.json", "predict_config.json"):
        rec = _read_json(storage.join(folder, name))
        if rec is not None and (name == "config.json") == (run is not None):
            rows.append(("mlc", f"{rec.get('mlc_version')} (commit {rec.get('git_commit') or 'unknown'}), "
                                f"{name} written {rec.get('written')}"))
    rows.append(("report written", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")))
    return rows


def _metrics(run: dict | None, meta: dict) -> list:
    """The best epoch's scores: metrics.json's best row when the run's own, else what meta.json recorded."""
    if run is not None:
        best = next((r for r in run.get("epochs", []) if r.get("epoch") == run.get("best_epoch")), run.get("best", {}))
        rows = [(name, best.get(key)) for key, name in METRIC_NAMES if best.get(key) is not None]
        rows.append(("baseline F1 (samples): always the most frequent label set", run.get("baseline_f1_samples")))
        return rows
    m = meta.get("metrics") or {}
    return [(name, m[key]) for key, name in METRIC_NAMES if m.get(key) is not None]


def _validation(report: Report, mfolder: str, choice: ThresholdChoice, paths: DataPaths, data) -> dict | None:
    """The per-class table, the errors and the co-occurrence from the model's validation scores; returns the arrays
    (``truth``, ``probs``) the plots need, None without validation scores."""
    url = storage.join(mfolder, "val_probabilities.csv")
    if not storage.exists(url):
        report.notes.append(f"{mfolder} holds no validation scores (val_probabilities.csv): no per-class table, "
                            "errors or co-occurrence; a run's best/ or epoch_NNNN/ has them")
        return None
    table = pd.read_csv(io.BytesIO(storage.read_bytes(url)), dtype={"ImageID": str})
    probs = table[report.labels].to_numpy(dtype=np.float64)
    truth = table[[f"true_{c}" for c in report.labels]].to_numpy() > 0
    ok = ~np.isnan(probs).any(axis=1)
    ids = table.ImageID[ok].tolist()
    probs, truth = probs[ok], truth[ok]
    report.n_val = len(ids)
    if not ids:
        report.notes.append(f"{url}: no validation image was scored")
        return None
    pred = choice.apply(probs)
    captions = _captions(data.train_df if data is not None else None, paths.train_csv, ids, report.notes)
    report.per_class = analysis.per_class_rows(report.labels, truth, probs, pred, choice)
    report.errors = analysis.worst_errors(ids, captions, truth, probs, pred)
    report.co = analysis.co_occurrence(truth, pred)
    return {"truth": truth, "probs": probs}


def _captions(df, table_url: str, ids: list, notes: list, reader=None) -> list:
    """Each of ``ids``' caption from the table (``df``, or read from ``table_url``); None where there is none."""
    if df is None:
        try:
            df = (reader or read_table)(table_url)
        except Exception as e:  # noqa: BLE001 - the report goes on without captions, and says why
            notes.append(f"captions not shown: cannot read {storage.safe_url(table_url)} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})")
            return [None] * len(ids)
    if "Caption" not in df.columns:
        return [None] * len(ids)
    by_id = dict(zip(df.ImageID.astype(str), df.Caption))
    return [by_id.get(i) for i in ids]


def _ids_captions(url: str):
    ids, captions = read_ids_captions(url)
    return pd.DataFrame({"ImageID": ids, **({"Caption": captions} if captions is not None else {})})


def _test(report: Report, folder: str, test_csv: str, test_df, max_test: int) -> None:
    """A sample of the folder's test predictions: predicted labels from predictions.csv, scores from
    probabilities.csv."""
    urls = [storage.join(folder, n) for n in ("predictions.csv", "probabilities.csv")]
    if not all(storage.exists(u) for u in urls):
        report.notes.append(f"{folder} holds no predictions.csv and probabilities.csv: no test predictions shown")
        return
    predicted = read_table(urls[0], require=("ImageID", "Labels"))
    table = pd.read_csv(io.BytesIO(storage.read_bytes(urls[1])), dtype={"ImageID": str})
    ids = table.ImageID.tolist()
    if predicted.ImageID.tolist() != ids:
        report.notes.append(f"{urls[0]} and {urls[1]} list other ImageIDs (one of them rewritten alone?): "
                            "no test predictions shown")
        return
    index = {lab: c for c, lab in enumerate(report.labels)}
    labels = [[index[lab] for lab in labs if lab in index] for labs in predicted.Labels]
    report.n_test = len(ids)
    captions = _captions(test_df, test_csv, ids, report.notes, reader=_ids_captions)
    report.test = analysis.test_sample(ids, captions, table[report.labels].to_numpy(dtype=np.float64), labels,
                                       max_test)


def _plots(folder: str, own_run: bool, val: dict | None, labels: list, meta: dict, notes: list) -> list:
    """plots/ of the folder (a run's: when the report is of its own best/; a sweep's sweep.png always), else the
    validation plots drawn here from the model's validation scores."""
    found = {}
    plots_url = storage.join(folder, "plots")
    names = storage.listdir(plots_url) if storage.isdir(plots_url) else []
    for name in sorted(n for n in names if n.endswith(".png")):
        stem = name[:-4]
        if not own_run and stem != "sweep":
            continue
        blob = storage.read_bytes(storage.join(plots_url, name))
        if blob.startswith(PNG_SIGNATURE) and len(blob) <= MAX_PLOT_BYTES:
            found[stem] = blob
        else:
            notes.append(f"plots/{name} left out: not a PNG of at most {MAX_PLOT_BYTES // 1000} KB")
    if not set(found) & {"per_class_f1", "threshold", "pr_curves"} and val is not None:
        found.update(_validation_plots(val, labels, meta))
    return sorted(found.items(), key=lambda kv: (PLOT_ORDER.index(kv[0]) if kv[0] in PLOT_ORDER else 99, kv[0]))


def _validation_plots(val: dict, labels: list, meta: dict) -> dict:
    from mlc.eval.thresholds import evaluate
    choice = ThresholdChoice.from_dict(meta["threshold"])
    truth, probs = val["truth"], val["probs"]
    m = evaluate(truth, probs, choice)
    _, curves = select_threshold(truth, probs)
    return {"per_class_f1": plotting.per_class_f1_png(labels, m["f1_per_class"], m["ap_per_class"]),
            "threshold": plotting.threshold_png(curves, choice),
            "pr_curves": plotting.pr_curves_png(truth, probs, labels)}


def image_url(images: str, image_id: str) -> str:
    """The image of ``image_id`` in the folder ``images``; an id that would leave it is refused
    (:func:`mlc.data.run_data.image_urls`)."""
    return image_urls(images, [image_id])[0]
