"""Writing a pack (:mod:`mlc.data.pack`): the plan (which rows go in which shard), one shard's rows read, fitted,
encoded and written whole, and the manifest. Each piece runs anywhere: :mod:`mlc.distributed.pack` runs the shards
as Ray Data tasks across a cluster's CPUs.

**Resuming.** The plan (``pack-plan.json``: the source's key and every shard's rows) is written first and the
manifest last. A shard is written whole (one upload, or a rename), and it carries the source's key and its rows in
its Parquet metadata, so a pack started again on the same output keeps every shard that was written for the same
source and rows, and writes the rest. An output holding another source's plan or manifest is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlc.data.augment import fit_to_slot, slot_side
from mlc.data.pack import (ENCODINGS, FORMAT, MANIFEST, QUALITY, ROW_GROUP_ROWS, SHARD_BYTES, TABLES, VERSION,
                           open_pack, rows_per_shard, shard_name)
from mlc.data.slot_codec import slot_jpeg
from mlc.data.table import read_table
from mlc.errors import MlcError, UsageError
from mlc.io import fetch, storage
from mlc.io.images import BadImageError, decode_fetched

PLAN = "pack-plan.json"
# Images encoded to size the shards: enough that one odd image moves the mean little, few enough to take a
# second or two before the work starts.
SAMPLE_IMAGES = 64


class PackOutputError(MlcError):
    """The output holds something other than this source's pack (exit 4: mlc.errors.KNOWN)."""


@dataclass
class Source:
    """What is packed: the two tables (read with mlc's reader) and where their images are."""
    train_csv: str
    test_csv: str
    images: str
    frames: dict
    key: str


def read_source(train_csv: str, test_csv: str, images: str, *, side: int, encoding: str, quality: int) -> Source:
    """The source tables, and its key: the tables' bytes, the image folder and the encoding settings. (Images
    replaced in place under the same names are not seen by the key: pack to a new output after that.)"""
    h = hashlib.sha256()
    for part in (FORMAT, VERSION, storage.safe_url(images), side, encoding, quality):
        h.update(repr(part).encode() + b"\0")
    for url in (train_csv, test_csv):
        h.update(hashlib.sha256(storage.read_bytes(url)).digest())
    frames = {"train": read_table(train_csv, require=("ImageID", "Labels"), labelled=True),
              "test": read_table(test_csv, require=("ImageID",))}
    return Source(train_csv, test_csv, images, frames, h.hexdigest()[:32])


def check_output(output: str, key: str) -> dict | None:
    """The plan already under ``output`` for this source (a pack to resume), None for an empty output; another
    source's plan or manifest, or files that are no pack, are refused (exit 4) before anything is written."""
    for name in (MANIFEST, PLAN):
        url = storage.join(output, name)
        if storage.exists(url):
            try:
                held = json.loads(storage.read_bytes(url))
            except ValueError:
                held = {}
            if held.get("source", {}).get("key") != key:
                raise PackOutputError(f"{storage.safe_url(output)} holds the pack of another source ({name} names "
                                      "another table, image folder or encoding); pack to an empty --output, or "
                                      "remove that pack first")
            if name == PLAN:
                return held
    if storage.isdir(output) and storage.listdir(output):
        raise PackOutputError(f"{storage.safe_url(output)} is not empty and holds no pack; pack to an empty --output")
    return None


def make_plan(source: Source, *, side: int, image_size: int, encoding: str, quality: int, max_pixels: int,
              shard_bytes: int = SHARD_BYTES, log=print) -> dict:
    """Every shard's table and rows, sized from a sample of encoded images so a shard is about ``shard_bytes``."""
    ids = list(source.frames["train"].ImageID[:SAMPLE_IMAGES])
    sizes = [len(r["image"]) for r in encode_rows(source.images, ids, side, encoding, quality, max_pixels)
             if r["image"]]
    mean = float(np.mean(sizes)) if sizes else float(side * side * 3)
    per_shard = rows_per_shard(mean, shard_bytes)
    shards = []
    for table in TABLES:
        n = len(source.frames[table])
        shards += [{"table": table, "k": k, "start": a, "end": min(n, a + per_shard)}
                   for k, a in enumerate(range(0, n, per_shard))]
    log(f"pack: {sum(len(f) for f in source.frames.values())} rows, {len(shards)} shards of up to {per_shard} rows "
        f"(about {mean / 1024:.1f} KB an image, {encoding}{f' quality {quality}' if encoding == 'jpeg' else ''}, "
        f"{side} px slots)")
    return {"format": FORMAT, "version": VERSION, "encoding": encoding, "quality": quality if encoding == "jpeg"
            else None, "side": side, "image_size": image_size, "rows_per_shard": per_shard,
            "row_group_rows": min(ROW_GROUP_ROWS, per_shard), "shards": shards,
            "source": {"key": source.key, "train_csv": storage.safe_url(source.train_csv),
                       "test_csv": storage.safe_url(source.test_csv), "images": storage.safe_url(source.images)},
            "captions": {t: "Caption" in source.frames[t].columns for t in TABLES}}


def encode_rows(images: str, ids: list, side: int, encoding: str, quality: int, max_pixels: int) -> list:
    """Each image read (many requests in flight), decoded as the store decodes it, fitted to the slot and encoded;
    an unreadable one is a row with no image and the reason."""
    from mlc.data.run_data import image_urls
    urls = image_urls(images, ids)
    out: dict = {}
    for url, data in fetch.start(dict.fromkeys(urls), cache=None):
        try:
            img = decode_fetched(data, url, max_pixels, draft=side)
        except BadImageError as e:
            out[url] = {"image": b"", "height": 0, "width": 0, "orig_height": 0, "orig_width": 0, "reason": e.reason}
            continue
        pixels = np.asarray(fit_to_slot(img, side))
        encoded = slot_jpeg(data, pixels, quality) if encoding == "jpeg" else np.ascontiguousarray(pixels).tobytes()
        out[url] = {"image": encoded, "height": pixels.shape[0], "width": pixels.shape[1],
                    "orig_height": img.size[1], "orig_width": img.size[0], "reason": ""}
    return [out[u] for u in urls]


def shard_table(frame: pd.DataFrame, rows: list | None, table: str):
    """The pyarrow Table of one shard: the table's columns (Labels joined by spaces) beside the images (none:
    the table's own file)."""
    import pyarrow as pa
    cols = {"ImageID": pa.array(list(frame.ImageID), pa.string())}
    if table == "train":
        cols["Labels"] = pa.array([" ".join(labs) for labs in frame.Labels], pa.string())
    if "Caption" in frame.columns:
        cols["Caption"] = pa.array([c if isinstance(c, str) else None for c in frame.Caption], pa.string())
    if rows is None:
        return pa.table(cols)
    cols["image"] = pa.array([r["image"] for r in rows], pa.binary())
    for name in ("height", "width", "orig_height", "orig_width"):
        cols[name] = pa.array([r[name] for r in rows], pa.int32())
    cols["reason"] = pa.array([r["reason"] for r in rows], pa.string())
    return pa.table(cols)


def write_shard(output: str, plan: dict, spec: dict, frame: pd.DataFrame, images: str, max_pixels: int) -> dict:
    """Shard ``spec`` of ``plan`` (rows of ``frame``, images in ``images``) read, encoded and written whole; one
    already there for this source and these rows is kept. Returns ``{file, rows, bytes, unreadable: {ImageID: reason}, seconds, kept}``."""
    import pyarrow.parquet as pq
    name = shard_name(spec["table"], spec["k"])
    url = storage.join(output, name)
    tag = {"mlc_pack_key": plan["source"]["key"], "mlc_pack_rows": f"{spec['start']}-{spec['end']}"}
    start = time.perf_counter()
    kept = _kept(url, tag)
    if kept is not None:
        return {**kept, "file": name, "seconds": time.perf_counter() - start, "kept": True}
    part = frame.iloc[spec["start"]:spec["end"]]
    rows = encode_rows(images, list(part.ImageID), plan["side"], plan["encoding"],
                       plan["quality"] or QUALITY, max_pixels)
    table = shard_table(part, rows, spec["table"])
    table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in tag.items()})
    buf = io.BytesIO()
    # JPEG bytes do not compress; raw pixels and the text columns do, cheaply.
    pq.write_table(table, buf, row_group_size=plan["row_group_rows"],
                   compression={c: ("none" if c == "image" and plan["encoding"] == "jpeg" else "zstd")
                                for c in table.column_names})
    storage.write_bytes(url, buf.getvalue())
    bad = {i: r["reason"] for i, r in zip(part.ImageID, rows) if r["reason"]}
    return {"file": name, "rows": len(part), "bytes": buf.tell(), "unreadable": bad,
            "seconds": time.perf_counter() - start, "kept": False}


def _kept(url: str, tag: dict) -> dict | None:
    """A shard already at ``url`` written for the same source and rows, read back from its footer; else None."""
    import pyarrow.parquet as pq
    if not storage.exists(url):
        return None
    try:
        data = storage.read_bytes(url)
        meta = pq.ParquetFile(io.BytesIO(data)).metadata
        held = {k.decode(): v.decode() for k, v in (meta.metadata or {}).items()}
        if any(held.get(k) != v for k, v in tag.items()):
            return None
        reasons = pq.read_table(io.BytesIO(data), columns=["ImageID", "reason"]).to_pydict()
    except Exception:  # noqa: BLE001 - a damaged leftover is written again
        return None
    bad = {i: r for i, r in zip(reasons["ImageID"], reasons["reason"]) if r}
    return {"rows": meta.num_rows, "bytes": len(data), "unreadable": bad}


def write_table(output: str, frame: pd.DataFrame, table: str) -> dict:
    """A table's own columns (no images) in one small file, so a run reads its tables in one request each."""
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(shard_table(frame, None, table), buf, compression="zstd")
    name = f"{table}-table.parquet"
    storage.write_bytes(storage.join(output, name), buf.getvalue())
    return {"file": name, "rows": len(frame), "bytes": buf.tell()}


def write_manifest(output: str, plan: dict, frames: dict, results: list, seconds: float) -> dict:
    """The tables' files and the manifest from the plan and every shard's result, written last: a pack without
    it is unfinished."""
    tables = {}
    for table in TABLES:
        mine = sorted((r for r in results if r["table"] == table), key=lambda r: r["k"])
        unreadable = {i: reason for r in mine for i, reason in r["unreadable"].items()}
        tables[table] = {"rows": sum(r["rows"] for r in mine), "captions": plan["captions"][table],
                         "table": write_table(output, frames[table], table),
                         "shards": [{"file": r["file"], "rows": r["rows"], "bytes": r["bytes"]} for r in mine],
                         "unreadable": unreadable}
    manifest = {k: plan[k] for k in ("format", "version", "encoding", "quality", "side", "image_size",
                                     "row_group_rows")}
    manifest.update(source=plan["source"], tables=tables, seconds=round(seconds, 1),
                    written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    storage.write_text(storage.join(output, MANIFEST), json.dumps(manifest, indent=1))
    open_pack(output)  # what was written reads back
    return manifest


@dataclass
class PackConfig:
    data: str
    output: str
    images: str | None = None
    train_csv: str | None = None
    test_csv: str | None = None
    format: str = "jpeg"
    image_size: int = 224
    quality: int = QUALITY
    shard_mb: float = SHARD_BYTES / 2**20
    max_image_pixels: int = 50_000_000
    cpus_per_task: float = 1.0


def check_config(cfg: PackConfig) -> None:
    if cfg.format not in ENCODINGS:
        raise UsageError(f"--format {cfg.format!r}: choose one of {', '.join(ENCODINGS)}")
    if not 1 <= cfg.quality <= 100:
        raise UsageError(f"--quality {cfg.quality}: a JPEG quality is 1 to 100")
    if not cfg.shard_mb > 0:
        raise UsageError(f"--shard-mb {cfg.shard_mb}: must be > 0")
    if cfg.image_size < 16 or cfg.image_size % 16:
        raise UsageError(f"--image-size {cfg.image_size}: a multiple of 16, at least 16")


@dataclass
class PackJob:
    """A pack about to be written: its source and plan; ``done``: the manifest of a pack already complete."""
    source: Source
    plan: dict
    done: dict | None = None


def start_pack(cfg: PackConfig, log=print) -> PackJob:
    """Everything before the shards: the flags and the source read, the output checked (another source's pack is
    refused, this source's unfinished one resumed), and the plan written."""
    from mlc.data.run_data import DataPaths
    check_config(cfg)
    paths = DataPaths.resolve(cfg.data, cfg.images, cfg.train_csv, cfg.test_csv)
    if paths.pack is not None:
        raise UsageError(f"--data {storage.safe_url(cfg.data)} is already a pack; pack its source instead")
    side = slot_side(cfg.image_size)
    quality = cfg.quality if cfg.format == "jpeg" else None
    source = read_source(paths.train_csv, paths.test_csv, paths.images, side=side, encoding=cfg.format,
                         quality=quality)
    plan = check_output(cfg.output, source.key)
    if plan is not None and storage.exists(storage.join(cfg.output, MANIFEST)):
        log(f"pack: {storage.safe_url(cfg.output)} already holds this source's pack; nothing to do")
        return PackJob(source, plan, done=open_pack(cfg.output).manifest)
    storage.check_writable(cfg.output)
    if plan is None:
        plan = make_plan(source, side=side, image_size=cfg.image_size, encoding=cfg.format, quality=quality,
                         max_pixels=cfg.max_image_pixels, shard_bytes=int(cfg.shard_mb * 2**20), log=log)
        storage.write_text(storage.join(cfg.output, PLAN), json.dumps(plan, indent=1))
    else:
        log(f"pack: resuming the unfinished pack in {storage.safe_url(cfg.output)} ({len(plan['shards'])} shards)")
    return PackJob(source, plan)


def finish_pack(cfg: PackConfig, job: PackJob, results: list, seconds: float, log=print) -> dict:
    """The manifest from every shard's result, written last, and the summary said."""
    manifest = write_manifest(cfg.output, job.plan, job.source.frames, results, seconds)
    _summary(manifest, results, seconds, log)
    return manifest


def said_shard(r: dict, done: int, total: int, log) -> None:
    what = "kept (written before)" if r["kept"] else f"{r['rows'] / max(r['seconds'], 1e-9):.0f} images/s"
    log(f"pack: shard {done}/{total} {r['file']}: {r['rows']} rows, {r['bytes'] / 2**20:.1f} MiB, {what}"
        + (f", {len(r['unreadable'])} unreadable" if r["unreadable"] else ""))


def _summary(manifest: dict, results: list, seconds: float, log) -> None:
    rows = sum(t["rows"] for t in manifest["tables"].values())
    written = sum(r["rows"] for r in results if not r["kept"])
    size = sum(s["bytes"] for t in manifest["tables"].values() for s in t["shards"])
    log(f"pack: {rows} rows in {sum(len(t['shards']) for t in manifest['tables'].values())} shards, "
        f"{size / 2**20:.1f} MiB ({size / max(rows, 1) / 1024:.1f} KB an image); {written} images packed in "
        f"{seconds:.1f} s ({written / max(seconds, 1e-9):.0f} images/s)")
    for table, t in manifest["tables"].items():
        for image_id, reason in list(t["unreadable"].items())[:20]:
            log(f"warning: {table}: unreadable image {image_id} ({reason}): packed as a row without an image")
        if len(t["unreadable"]) > 20:
            log(f"warning: {table}: {len(t['unreadable']) - 20} more unreadable images; all are named in "
                "manifest.json")


def pack_in_process(cfg: PackConfig, log=print) -> dict:
    """``jobs/pack.py`` without Ray: the shards written one after another in this process (benchmarks and tests
    that pack a few thousand images; jobs/pack.py spreads them over a cluster's CPUs). The manifest."""
    job = start_pack(cfg, log=log)
    if job.done is not None:
        return job.done
    start = time.perf_counter()
    results = [{**s, **write_shard(cfg.output, job.plan, s, job.source.frames[s["table"]], job.source.images,
                                   cfg.max_image_pixels)} for s in job.plan["shards"]]
    return finish_pack(cfg, job, results, time.perf_counter() - start, log=log)
