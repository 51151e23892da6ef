"""Packed datasets: a dataset's tables and images in Parquet shards beside a manifest, read with one request for
many images (``jobs/pack.py`` writes them: :mod:`mlc.data.pack_write`, spread by :mod:`mlc.distributed.pack`).

A pack is a folder (any URL) holding ``manifest.json`` and, for each table (``train``, ``test``), shards
``<table>-NNNNN.parquet`` of consecutive table rows, in row groups of :data:`ROW_GROUP_ROWS`. A row holds its
ImageID, Labels (space-separated; train only), Caption, the image fitted into the store's slot
(:func:`mlc.data.augment.fit_to_slot`: what the decode-once store would hold, so training sees the same pixels)
encoded as JPEG (or raw pixels), its stored and original sizes, and, for an image that could not be read, the
reason (its image is empty: the row is skipped and named in training, as an unreadable file is). The manifest,
written last, says the format version, the encoding, the slot, every shard's rows and bytes, the unreadable
images, and the key of the source it was packed from.

Everything read from a pack is checked against the manifest: a shard that is missing, truncated or holds other
rows, or a manifest of another format version, is refused naming the file (:class:`PackError`, exit 3).
"""

from __future__ import annotations

import io
import json
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mlc.errors import DataError
from mlc.io import storage

FORMAT, VERSION = "mlc-pack", 1
MANIFEST = "manifest.json"
TABLES = ("train", "test")
ENCODINGS = ("jpeg", "raw")
# JPEG quality of a shrunk image's slot (an image the slot holds unchanged keeps its own file:
# mlc.data.slot_codec.slot_jpeg). Measured on 200 real images shrunk to 183 px slots (docs/measurements-pack.md):
# 2.3 grey levels mean error at 8.8 KB, against 3.7 at 5.6 KB for 75 and 1.6 at 12.1 KB for 95: the knee.
QUALITY = 90
# Shards of about this many bytes: one request brings thousands of COMP5329 images, and a shard still fits a
# loader's memory whole (WebDataset and MDS shards are 64 MB to 1 GB).
SHARD_BYTES = 64 * 2**20
# Rows per Parquet row group: what a reader of a few rows (a prediction batch, a Ray Data block) fetches in one
# ranged request. 256 COMP5329 slots are about 4 MB: one request for a batch of 64-256 rows, and few enough
# bytes that a batch pays little for the rows of the group it does not need.
ROW_GROUP_ROWS = 256
IMAGE_COLUMNS = ["image", "height", "width", "orig_height", "orig_width", "reason"]


class PackError(DataError):
    """A pack that cannot be read as it claims: the message names the file and what is wrong (exit 3)."""


def is_pack(url: str) -> bool:
    return storage.exists(storage.join(url, MANIFEST))


@dataclass
class Pack:
    """An opened pack: its folder and its (checked) manifest."""
    url: str
    manifest: dict
    # Tables read through this opening (read_frame): a run reads them for its rows and again to locate its
    # ImageIDs, and each read of a bucket's file is a request's latency before the first step. A pickled Pack
    # (sent to a Ray task) goes without them.
    frames: dict = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {"url": self.url, "manifest": self.manifest, "frames": {}}

    @property
    def side(self) -> int:
        return int(self.manifest["side"])

    @property
    def encoding(self) -> str:
        return self.manifest["encoding"]

    def shards(self, table: str) -> list:
        return self.manifest["tables"][table]["shards"]

    def rows(self, table: str) -> int:
        return sum(s["rows"] for s in self.shards(table))

    def starts(self, table: str) -> np.ndarray:
        """The table row each shard starts at."""
        return np.cumsum([0] + [s["rows"] for s in self.shards(table)])[:-1]

    def names(self, table: str, ids) -> list:
        """A name per row for logs and skipped-image warnings: ``<pack>/<table>/<ImageID>``."""
        return [storage.join(self.url, table, str(i)) for i in ids]


def open_pack(url: str) -> Pack:
    """The pack at ``url``, its manifest checked; a manifest of another format or version is refused."""
    path = storage.join(url, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise PackError(f"{storage.safe_url(path)}: not a pack manifest ({type(e).__name__}); pack the dataset "
                        "again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackError(f"{storage.safe_url(path)}: not an mlc pack manifest")
    if manifest.get("version") != VERSION:
        raise PackError(f"{storage.safe_url(path)}: a pack of format version {manifest.get('version')!r}, this mlc "
                        f"reads version {VERSION}; pack the dataset again with this mlc's jobs/pack.py")
    tables = manifest.get("tables")
    if manifest.get("encoding") not in ENCODINGS or not isinstance(tables, dict) or \
            not isinstance(manifest.get("row_group_rows"), int) or manifest["row_group_rows"] < 1 or \
            not all(isinstance(tables.get(t), dict) and isinstance(tables[t].get("shards"), list) for t in TABLES):
        raise PackError(f"{storage.safe_url(path)}: its encoding or tables are not ones this mlc writes; pack again")
    return Pack(str(url), manifest)


def check_side(pack: Pack, image_size: int) -> None:
    """A run at ``image_size`` reads slots of :func:`mlc.data.augment.slot_side` px: a pack of smaller ones would
    be images enlarged, so it is refused."""
    from mlc.data.augment import slot_side
    if pack.side < slot_side(image_size):
        raise PackError(f"{storage.safe_url(pack.url)}: packed for {pack.side} px slots, and --image-size {image_size} "
                        f"reads {slot_side(image_size)} px; pack again with jobs/pack.py --image-size {image_size}")


def _shard_url(pack: Pack, table: str, k: int) -> tuple[str, dict]:
    spec = pack.shards(table)[k]
    return storage.join(pack.url, spec["file"]), spec


def read_shard(pack: Pack, table: str, k: int, columns: list | None = None):
    """Shard ``k`` of ``table``, read whole in one request, as a pyarrow Table (``columns`` only), checked
    against the manifest."""
    import pyarrow.parquet as pq
    url, spec = _shard_url(pack, table, k)
    data = _read_checked(url, spec)
    try:
        out = pq.read_table(io.BytesIO(data), columns=columns)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
        raise PackError(f"{storage.safe_url(url)}: not a readable Parquet shard ({type(e).__name__}); "
                        "pack again") from None
    if out.num_rows != spec["rows"]:
        raise PackError(f"{storage.safe_url(url)}: {out.num_rows} rows, the manifest says {spec['rows']}; pack again")
    return out


def read_frame(pack: Pack, table: str) -> pd.DataFrame:
    """``table`` as :func:`mlc.data.table.read_table` would give it: ImageID, Labels (lists; train only) and
    Caption (where the source had a Caption column), in the source's row order. Read from the table's own
    small file (one request, the first time through this ``pack``), not from the shards of images."""
    if table not in pack.frames:
        pack.frames[table] = _read_frame(pack, table)
    return pack.frames[table].copy()


def read_frames(pack: Pack) -> None:
    """Both tables read through ``pack`` at once, their requests in flight together: a run needs both before
    its first step (its rows, and every ImageID located in the pack)."""
    from concurrent.futures import ThreadPoolExecutor
    todo = [t for t in TABLES if t not in pack.frames]
    with ThreadPoolExecutor(max(1, len(todo))) as pool:
        pack.frames.update(zip(todo, pool.map(lambda t: _read_frame(pack, t), todo)))


def _read_frame(pack: Pack, table: str) -> pd.DataFrame:
    import pyarrow.parquet as pq
    spec = pack.manifest["tables"][table].get("table")
    if not isinstance(spec, dict):
        raise PackError(f"{storage.safe_url(storage.join(pack.url, MANIFEST))}: names no file for the {table} table; "
                        "pack again")
    url = storage.join(pack.url, spec["file"])
    data = _read_checked(url, spec)
    try:
        df = pq.read_table(io.BytesIO(data)).to_pandas()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
        raise PackError(f"{storage.safe_url(url)}: not a readable Parquet table ({type(e).__name__}); pack again") from None
    if len(df) != spec["rows"] or len(df) != pack.rows(table):
        raise PackError(f"{storage.safe_url(url)}: {len(df)} rows, the manifest says {spec['rows']} and its shards "
                        f"hold {pack.rows(table)}; pack again")
    if "Labels" in df.columns:
        df["Labels"] = [s.split() if isinstance(s, str) else [] for s in df.Labels]
    return df


def _read_checked(url: str, spec: dict) -> bytes:
    """A pack file read whole, its size held to the manifest's."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise PackError(f"{storage.safe_url(url)}: a file the manifest lists is missing; pack again") from None
    if len(data) != spec["bytes"]:
        raise PackError(f"{storage.safe_url(url)}: {len(data):,} bytes, the manifest says {spec['bytes']:,} (a "
                        "truncated or replaced file); pack again")
    return data


def shard_problems(pack: Pack) -> list:
    """What is wrong with the files the manifest lists: missing or another size (one listing of the pack), or a
    shard whose footer disagrees with the manifest (one ranged read of each shard's tail, not the images). Empty
    when every file is as the manifest says."""
    have = storage.sizes(pack.url)
    problems = []
    for table in TABLES:
        groups = RowGroups(pack, table)
        for k, spec in enumerate(pack.shards(table) + [pack.manifest["tables"][table].get("table") or {}]):
            name = spec.get("file", "")
            url = storage.safe_url(storage.join(pack.url, name))
            if name not in have:
                problems.append(f"{url}: listed in the manifest, missing; pack again")
            elif have[name] != spec["bytes"]:
                problems.append(f"{url}: {have[name]:,} bytes, the manifest says {spec['bytes']:,} (truncated or "
                                "replaced); pack again")
            elif k < len(pack.shards(table)):
                try:
                    groups.footer(k)
                except PackError as e:
                    problems.append(str(e))
    return problems


def unreadable(pack: Pack, table: str) -> dict:
    """``{ImageID: reason}`` of the images the pack could not read (they are rows without an image)."""
    return dict(pack.manifest["tables"][table].get("unreadable", {}))


def shard_name(table: str, k: int) -> str:
    return f"{table}-{k:05d}.parquet"


def rows_per_shard(sample_bytes: float, target: int = SHARD_BYTES) -> int:
    """Rows a shard of about ``target`` bytes holds, from the mean encoded bytes of a sample of images: whole row
    groups of :data:`ROW_GROUP_ROWS` when a shard holds that many, else the rows that fit (at least one)."""
    rows = max(1, int(target // max(1.0, sample_bytes)))
    return rows if rows < ROW_GROUP_ROWS else rows // ROW_GROUP_ROWS * ROW_GROUP_ROWS


def group_rows(pack: "Pack") -> int:
    """Rows in each row group of the pack's shards (the last of a shard may hold fewer)."""
    return int(pack.manifest["row_group_rows"])


class _Ranges(io.RawIOBase):
    """A read-only file of ``size`` bytes of which only some ranges were fetched: enough for pyarrow to read a
    footer and the row groups whose bytes are here. A read outside them is a bug of the caller: it raises."""

    def __init__(self, size: int):
        self.size, self.pos, self.parts = size, 0, []

    def add(self, start: int, data: bytes) -> None:
        self.parts.append((start, data))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        for start, data in self.parts:
            if start <= self.pos and self.pos + n <= start + len(data):
                out = data[self.pos - start:self.pos - start + n]
                self.pos += n
                return out
        raise OSError(f"bytes {self.pos}..{self.pos + n} were not fetched")


def _span(chunk) -> tuple[int, int]:
    """A column chunk's bytes in its file: from its dictionary page (if any) through its data pages."""
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    return start, start + chunk.total_compressed_size


class RowGroups:
    """Rows of a pack's table read a row group at a time (one ranged request each, after one for the shard's
    footer), the last few groups kept: what a reader of a few rows at a time (prediction, a Ray Data block)
    needs. Safe to share between threads of one process."""

    def __init__(self, pack: Pack, table: str, keep: int = 4):
        self.pack, self.table, self.keep = pack, table, keep
        self.starts = pack.starts(table)
        self._footers: dict = {}
        self._groups: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def locate(self, row: int) -> tuple[int, int, int]:
        """(shard, row group, offset in the group) of table row ``row``."""
        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        within = row - int(self.starts[k])
        per = group_rows(self.pack)
        return k, within // per, within % per

    def group(self, k: int, g: int):
        """Row group ``g`` of shard ``k`` as a pyarrow Table of the image columns."""
        with self._lock:
            if (k, g) in self._groups:
                self._groups.move_to_end((k, g))
                return self._groups[(k, g)]
        table = self._read(k, g)
        with self._lock:
            self._groups[(k, g)] = table
            while len(self._groups) > self.keep:
                self._groups.popitem(last=False)
        return table

    def _read(self, k: int, g: int):
        import pyarrow.parquet as pq
        url, _ = _shard_url(self.pack, self.table, k)
        file, meta = self.footer(k)
        if g >= meta.num_row_groups:
            raise PackError(f"{storage.safe_url(url)}: no row group {g}; pack again")
        rg = meta.row_group(g)
        spans = [_span(rg.column(c)) for c in range(rg.num_columns)]
        start, end = min(a for a, _ in spans), max(b for _, b in spans)
        ranged = _Ranges(file.size)
        ranged.parts = list(file.parts)
        ranged.add(start, storage.read_range(url, start, end))
        return pq.ParquetFile(ranged, metadata=meta).read_row_group(g, columns=IMAGE_COLUMNS)

    def footer(self, k: int):
        """Shard ``k``'s Parquet footer (a ranged read of its tail), checked against the manifest: ``(file, meta)``."""
        with self._lock:
            if k in self._footers:
                return self._footers[k]
        import pyarrow.parquet as pq
        url, spec = _shard_url(self.pack, self.table, k)
        size = spec["bytes"]
        try:
            tail = storage.read_range(url, max(0, size - 65536), size)
        except FileNotFoundError:
            raise PackError(f"{storage.safe_url(url)}: a shard the manifest lists is missing; pack again") from None
        if len(tail) < min(size, 65536) or tail[-4:] != b"PAR1":
            raise PackError(f"{storage.safe_url(url)}: shorter than the manifest's {size:,} bytes or not Parquet (a "
                            "truncated or replaced shard); pack again")
        need = struct.unpack("<I", tail[-8:-4])[0] + 8
        if need > len(tail):
            tail = storage.read_range(url, size - need, size)
        file = _Ranges(size)
        file.add(size - len(tail), tail)
        try:
            meta = pq.ParquetFile(file).metadata
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged footer
            raise PackError(f"{storage.safe_url(url)}: not a readable Parquet shard ({type(e).__name__}); "
                            "pack again") from None
        if meta.num_rows != spec["rows"]:
            raise PackError(f"{storage.safe_url(url)}: {meta.num_rows} rows, the manifest says {spec['rows']}; "
                            "pack again")
        with self._lock:
            self._footers[k] = (file, meta)
        return file, meta
