"""What each ``--inputs`` scores on one dataset, side by side: the README's comparison table.

Rows, all on the same seeded validation split (``--val-fraction``, ``--seed``):
- a linear baseline (TF-IDF word 1-2-grams, one-vs-rest logistic regression, scikit-learn) on the captions,
  judged with mlc's own threshold search, as a reference;
- ``--inputs caption`` on every labelled row (captions only: no image is opened);
- on the rows whose image is present (a partial copy of the images, such as the 2,511 real ones beside the
  repo): the baseline again, then ``image``, ``caption`` and ``image+caption``.
Every mlc row is a real training run (:func:`mlc.fit`) with the given settings; its numbers are the best
epoch's validation metrics.
"""

from __future__ import annotations

import time

import pandas as pd

from mlc.io import storage
from mlc.config import TrainConfig
from mlc.data.run_data import DataPaths, read_tables
from mlc.data.splits import split_rows
from mlc.data.labels import LabelVocab
from mlc.data.pack import TABLES, open_pack, read_frame, unreadable
from mlc.eval.thresholds import evaluate

# At or above any backbone's stage count (ResNet50: 4; timm's EfficientNets: 7): every stage trains, stem included.
UNFROZEN_ALL = 99
COLUMNS = ("rows", "inputs", "f1_samples", "f1_micro", "f1_macro", "map", "threshold", "seconds")


def linear_baseline(df: pd.DataFrame, val_fraction: float, seed: int, c: float = 10.0,
                    split: str = "stratified") -> dict:
    """TF-IDF (word 1-2-grams, sublinear tf) + one-vs-rest logistic regression on the training split's
    captions, scored on the validation split by :func:`mlc.eval.thresholds.evaluate`. ``c``: measured on the real
    train.csv, 10 scored above 1 and 4."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    start = time.perf_counter()
    vocab = LabelVocab.from_label_lists(df.Labels)
    y = vocab.encode(df.Labels)
    tr, va = split_rows(split, df.ImageID, y, val_fraction, seed)
    text = df.Caption.fillna("").astype(str)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    x = vec.fit_transform(text.iloc[tr])
    clf = OneVsRestClassifier(LogisticRegression(C=c, max_iter=2000)).fit(x, y[tr])
    m = evaluate(y[va], clf.predict_proba(vec.transform(text.iloc[va])))
    return _row(len(df), "linear baseline (captions)", m, time.perf_counter() - start)


def _row(rows: int, inputs: str, m: dict, seconds: float) -> dict:
    t = m["threshold"]
    return {"rows": rows, "inputs": inputs, "f1_samples": m["f1_samples"], "f1_micro": m["f1_micro"],
            "f1_macro": m["f1_macro"], "map": m["map"],
            "threshold": t["strategy"] + (f" {t['value']:g}" if isinstance(t["value"], float) else ""),
            "seconds": seconds}


def _fit(cfg: TrainConfig, rows: int, log) -> dict:
    from mlc.train.driver import fit
    summary = fit(cfg, fresh=True, log=log, progress=False)
    return _row(rows, cfg.inputs, {**summary["best"], "threshold": summary["threshold"]}, summary["seconds"])


def compare(data: str, output: str, *, images: str | None = None, val_fraction: float = 0.2, seed: int = 0,
            caption_epochs: int = 10, image_epochs: int = 8, image_size: int = 64, model: str = "resnet50",
            log=print) -> pd.DataFrame:
    """The table (see the module docstring); also written to ``output/compare.csv``."""
    paths = DataPaths.resolve(data, images)
    pack = open_pack(paths.pack) if paths.pack else None
    df, test = read_tables(paths, pack=pack)
    rows = []
    caption = TrainConfig(data=data, images=images, inputs="caption", weights="none", val_fraction=val_fraction,
                          seed=seed, epochs=caption_epochs)
    log(f"compare: {len(df)} labelled rows in {paths.train_csv}")
    rows.append(linear_baseline(df, val_fraction, seed))
    log(f"  {rows[-1]}")
    rows.append(_fit(caption.replace(output=storage.join(output, "caption_all")), len(df), log))
    log(f"  {rows[-1]}")

    subset = write_present_subset(paths, pack, df, test, output, log)
    if subset is None:
        return _table(rows, output)
    sub_train, sub_test, sub = subset
    rows.append(linear_baseline(sub, val_fraction, seed))
    log(f"  {rows[-1]}")
    scratch = scratch_settings(data, images, sub_train, sub_test, image_size=image_size, val_fraction=val_fraction,
                               seed=seed, model=model)
    for inputs in ("image", "caption", "image+caption"):
        epochs = caption_epochs if inputs == "caption" else image_epochs
        cfg = TrainConfig(**scratch, inputs=inputs, epochs=epochs,
                          output=storage.join(output, f"subset_{inputs.replace('+', '_')}"))
        if inputs == "caption":  # the caption network's own defaults, as on all rows
            cfg = cfg.replace(unfrozen_depth=caption.unfrozen_depth, dropout=caption.dropout, lr=caption.lr,
                              warmup_epochs=caption.warmup_epochs, amp=caption.amp)
        rows.append(_fit(cfg, len(sub), log))
        log(f"  {rows[-1]}")
    return _table(rows, output)


def write_present_subset(paths: DataPaths, pack, df: pd.DataFrame, test: pd.DataFrame, output: str, log=print):
    """The labelled rows whose image is present, as their own dataset: ``(train_csv, test_csv, rows)`` written
    under ``output/subset/``, or None (logged) when fewer than 20 rows have their image."""
    present = _present(paths, pack)
    sub = df[df.ImageID.isin(present)].reset_index(drop=True)
    if len(sub) < 20:
        log(f"image rows: only {len(sub)} labelled rows have their image in {paths.images}; no image rows")
        return None
    sub_root = storage.join(output, "subset")
    storage.write_text(storage.join(sub_root, "train.csv"), _csv(sub))
    storage.write_text(storage.join(sub_root, "test.csv"), _csv(test[test.ImageID.isin(present)]))
    log(f"image rows: {len(sub)} labelled rows with images present")
    return storage.join(sub_root, "train.csv"), storage.join(sub_root, "test.csv"), sub


def scratch_settings(data: str, images: str | None, train_csv: str, test_csv: str, *, image_size: int,
                     val_fraction: float, seed: int, model: str) -> dict:
    """TrainConfig fields of an image network trained from scratch (no ImageNet download here), as the demo
    trains: every stage, no dropout, fp32 (from-scratch training under CPU bf16 lost accuracy,
    mlc.data.demo.DEMO_DEFAULTS)."""
    return dict(data=data, images=images, train_csv=train_csv, test_csv=test_csv, weights="none",
                unfrozen_depth=UNFROZEN_ALL, dropout=0.0, lr=2e-3, warmup_epochs=0.5, amp="off",
                image_size=image_size, val_fraction=val_fraction, seed=seed, model=model)


def _present(paths: DataPaths, pack) -> set:
    """The ImageIDs whose image can be read: the folder's files, or a pack's rows it did not record as unreadable."""
    if pack is None:
        return set(storage.listdir(paths.images)) if storage.isdir(paths.images) else set()
    bad = {**unreadable(pack, "train"), **unreadable(pack, "test")}
    return {i for t in TABLES for i in read_frame(pack, t).ImageID if i not in bad}


def _csv(df: pd.DataFrame) -> str:
    out = df.copy()
    out["Labels"] = out.Labels.map(" ".join) if "Labels" in out else None
    cols = [c for c in ("ImageID", "Labels", "Caption") if c in df.columns]
    return out[cols].to_csv(index=False)


def _table(rows: list, output: str) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    storage.write_text(storage.join(output, "compare.csv"), table.to_csv(index=False))
    return table


def markdown(table: pd.DataFrame) -> str:
    lines = ["| rows | inputs | samples F1 | micro F1 | macro F1 | mAP | threshold | seconds |", "|---" * 8 + "|"]
    for r in table.itertuples():
        lines.append(f"| {r.rows} | {r.inputs} | {r.f1_samples:.4f} | {r.f1_micro:.4f} | {r.f1_macro:.4f} | "
                     f"{r.map:.4f} | {r.threshold} | {r.seconds:.0f} |")
    return "\n".join(lines)
