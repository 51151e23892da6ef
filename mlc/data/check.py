"""The dataset check: rows, label vocabulary and counts, labels per image, missing and unreadable images."""

from __future__ import annotations

import os
from collections import Counter

from mlc import logs
from mlc.io import storage
from mlc.data.pack import TABLES, PackError, open_pack, read_frame, shard_problems, unreadable
from mlc.data.run_data import DataPaths, check_training_rows
from mlc.io.images import BadImageError, read_header
from mlc.data.labels import LabelVocab
from mlc.data.table import TableError, read_table, unlabelled_rows

# Image headers are tiny reads dominated by latency on object stores: many in flight hide it. Reads go
# in chunks, so a 40,000-image folder is never in memory at once.
CONCURRENCY = 32
CHUNK = 1024


def _header(url: str, data, max_pixels: int):
    """Why the image read as ``data`` (bytes, or the storage exception) is unusable, or None."""
    if isinstance(data, FileNotFoundError):
        return "missing"
    if isinstance(data, BaseException):
        raise data  # permission, network after retries: the check cannot say anything about this image
    try:
        read_header(data, url, max_pixels=max_pixels)
        return None
    except BadImageError as e:
        return e.reason


def _symlinks(images: str, ids: list) -> dict:
    """``{ImageID: where it points}`` for the images of a local folder that are symbolic links. A link its
    owner put in the folder is read like any image; the report says where each leads, so a link to a file
    outside the folder is seen rather than followed blindly."""
    if not storage.is_local(images):
        return {}
    _, root = storage.filesystem(images)
    out = {}
    for i in ids:
        path = os.path.join(root, i)
        if os.path.islink(path):
            real = os.path.realpath(path)
            inside = os.path.commonpath([real, os.path.realpath(root)]) == os.path.realpath(root)
            out[i] = real + ("" if inside else " (outside the image folder)")
    return out


def check_dataset(paths: DataPaths, *, max_pixels: int = 50_000_000, progress: bool = True,
                  require_labels: bool = False) -> dict:
    """A report dict; ``problems`` lists everything wrong (empty when the dataset is usable as is).
    ``unlabelled_rows`` counts training rows with an empty Labels field (images with none of the labels, which
    train as all-negative examples); with ``require_labels`` the first of them is a problem, as in training.
    A pack (``paths.pack``) is checked as it will be read: its manifest, its tables (or the given ones, looked up
    in it), every shard's presence and size, and the images it recorded as unreadable when it was packed."""
    report: dict = {"train_csv": paths.train_csv, "test_csv": paths.test_csv, "images": paths.images, "problems": []}
    pack = None
    if paths.pack is not None:
        try:
            pack = open_pack(paths.pack)
        except PackError as e:
            report["problems"].append(str(e))
            return report
    tables = _check_tables(paths, pack, require_labels, report)
    ids = [i for t in tables.values() for i in t.ImageID]
    if pack is not None:
        _check_pack_images(pack, ids, report)
    else:
        _check_folder(paths.images, ids, max_pixels, progress, report)
    return report


def _check_tables(paths: DataPaths, pack, require_labels: bool, report: dict) -> dict:
    """The tables that could be read (``{"train": frame, "test": frame}``), with their counts in ``report``."""
    tables = {}
    for name, url, req in (("train", paths.train_csv, ("ImageID", "Labels")), ("test", paths.test_csv, ("ImageID",))):
        try:
            if pack is not None and url == storage.join(pack.url, name):
                tables[name] = read_frame(pack, name)
                if name == "train":
                    check_training_rows(tables[name], url, require_labels)
            else:
                tables[name] = read_table(url, require=req, trains=name == "train",
                                          require_labels=require_labels and name == "train")
            report[f"{name}_rows"] = len(tables[name])
        except (TableError, PackError, FileNotFoundError) as e:
            report["problems"].append(str(e))
    if "train" in tables:
        train = tables["train"]
        vocab = LabelVocab.from_label_lists(train.Labels)
        counts = Counter(lab for labs in train.Labels for lab in labs)
        report["labels"] = {lab: counts[lab] for lab in vocab.labels}
        per_image = Counter(len(set(labs)) for labs in train.Labels)
        report["labels_per_image"] = {str(k): per_image[k] for k in sorted(per_image)}
        report["unlabelled_rows"] = unlabelled_rows(train)
        repeated = [i for i, labs in zip(train.ImageID, train.Labels) if len(set(labs)) != len(labs)]
        if repeated:
            report["problems"].append(f"{len(repeated)} training rows repeat a label: {', '.join(repeated[:10])}")
    return tables


def _check_pack_images(pack, ids: list, report: dict) -> None:
    """Which of ``ids`` the pack holds, which it recorded as unreadable, and whether every shard the manifest
    lists is there at its size (a listing, not a read: the shards' contents are checked as they are read)."""
    held: dict = {}
    for table in TABLES:
        for image_id in read_frame(pack, table).ImageID:
            held.setdefault(image_id, table)
    bad = {**unreadable(pack, "train"), **unreadable(pack, "test")}
    missing = [i for i in ids if i not in held]
    found = [i for i in ids if i in held]
    report["images_found"] = len(found)
    report["missing_images"] = len(missing)
    report["missing_examples"] = missing[:20]
    report["unreadable_images"] = {i: bad[i] for i in found if i in bad}
    report["problems"] += shard_problems(pack)
    if missing:
        report["problems"].append(f"{len(missing)} of {len(ids)} ImageIDs are not in the pack {pack.url}, "
                                  f"e.g. {', '.join(missing[:10])}")
    if report["unreadable_images"]:
        report["problems"].append(f"{len(report['unreadable_images'])} images were unreadable when packed: "
                                  + ", ".join(f"{k} ({v})" for k, v in list(report["unreadable_images"].items())[:10]))


def _check_folder(images: str, ids: list, max_pixels: int, progress: bool, report: dict) -> None:
    """Which of ``ids`` the folder ``images`` holds and which of those cannot be read (headers read concurrently)."""
    if not storage.isdir(images):
        report["problems"].append(f"image folder {images} does not exist; point --images at it")
        report["missing_images"] = len(ids)
        return
    present = set(storage.listdir(images))  # one listing instead of 40,000 existence checks
    missing = [i for i in ids if i not in present]
    to_read = [i for i in ids if i in present]
    reasons: dict = {}

    def reads():
        for k in range(0, len(to_read), CHUNK):
            yield from storage.start_reads([storage.join(images, i) for i in to_read[k:k + CHUNK]], CONCURRENCY)
    # A bar on a terminal, heartbeat lines in a log file (mlc.logs).
    for url, data in logs.progress(reads(), desc="image headers", total=len(to_read), enabled=progress, unit="img"):
        reasons[url] = _header(url, data, max_pixels)
    unreadable_ = {i: r for i in to_read if (r := reasons[storage.join(images, i)]) is not None}
    report["symlinks"] = _symlinks(images, to_read)
    report["images_found"] = len(to_read)
    report["missing_images"] = len(missing)
    report["missing_examples"] = missing[:20]
    report["unreadable_images"] = unreadable_
    if missing:
        report["problems"].append(f"{len(missing)} of {len(ids)} images are missing from {images}, "
                                  f"e.g. {', '.join(missing[:10])}")
    if unreadable_:
        report["problems"].append(f"{len(unreadable_)} images are unreadable: "
                                  + ", ".join(f"{k} ({v})" for k, v in list(unreadable_.items())[:10]))


def format_report(r: dict) -> str:
    lines = [f"train: {r.get('train_rows', '?')} rows ({r['train_csv']})",
             f"test:  {r.get('test_rows', '?')} rows ({r['test_csv']})"]
    if "labels" in r:
        lines.append(f"labels ({len(r['labels'])}): " + ", ".join(f"{k}:{v}" for k, v in r["labels"].items()))
        lines.append("labels per image: " + ", ".join(f"{k}:{v}" for k, v in r["labels_per_image"].items()))
        if r.get("unlabelled_rows"):
            lines.append(f"rows with no labels: {r['unlabelled_rows']} of {r['train_rows']} (images with none of the "
                         "labels: all-negative training examples)")
    if "images_found" in r:
        lines.append(f"images: {r['images_found']} found, {r['missing_images']} missing, "
                     f"{len(r['unreadable_images'])} unreadable ({r['images']})")
    if r.get("symlinks"):
        links = list(r["symlinks"].items())
        lines.append(f"symbolic links: {len(links)} images are links, read where they point: "
                     + ", ".join(f"{k} -> {v}" for k, v in links[:10]) + (", ..." if len(links) > 10 else ""))
    lines.append("problems:" if r["problems"] else "no problems found")
    lines += [f"  - {p}" for p in r["problems"]]
    return "\n".join(lines)
