"""What a file is now, without reading it: size and modification stamp (a local file's mtime, an object's
generation or etag), for keys that must change whenever any of the files they cover changes.

One listing per folder, not one request per file: 40,000 objects in one gs:// folder are 40 listing pages,
a few seconds, instead of 40,000 round trips.
"""

from __future__ import annotations

import hashlib
import os
import posixpath

from mlc.io import storage

# The fields of an fsspec listing entry that change when an object is rewritten, most specific first:
# gcsfs's generation, then what other backends give (etag, md5, mtime).
_STAMPS = ("generation", "etag", "md5Hash", "mtime", "updated", "LastModified", "created")


def _local_stamp(path: str) -> str | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _entry_stamp(entry: dict) -> str:
    stamp = next((str(entry[k]) for k in _STAMPS if entry.get(k) not in (None, "")), "")
    return f"{entry.get('size')}:{stamp}"


def stamps(urls: list[str]) -> list[str | None]:
    """Each URL's size and modification stamp (None for a file that is not there), in ``urls``' order."""
    if not urls:
        return []
    if storage.is_local(urls[0]):
        return [_local_stamp(storage.filesystem(u)[1]) for u in urls]
    fs, _ = storage.filesystem(urls[0])
    folders: dict = {}
    paths = [storage.filesystem(u)[1] for u in urls]
    for p in paths:
        folders.setdefault(posixpath.dirname(p.rstrip("/")), None)
    listed: dict = {}
    for folder in folders:
        try:
            for entry in fs.ls(folder, detail=True):
                listed[entry["name"].rstrip("/")] = _entry_stamp(entry)
        except FileNotFoundError:
            continue
    return [listed.get(p.rstrip("/")) for p in paths]


def digest(urls: list[str], *extra) -> str:
    """A hex key of ``urls`` in order, each file's stamp, and ``extra`` (sizes, versions): it changes when a
    file is added, removed, reordered or rewritten."""
    h = hashlib.sha256()
    for part in extra:
        h.update(repr(part).encode() + b"\0")
    for url, stamp in zip(urls, stamps(urls)):
        h.update(url.encode() + b"\0" + (stamp or "-").encode() + b"\n")
    return h.hexdigest()
