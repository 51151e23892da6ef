"""The one place that knows about URLs and filesystems.

Every other module takes URLs (a local path, ``file://``, ``gs://bucket/key``,
``memory://``, anything fsspec opens) and calls these functions.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import uuid
from typing import Iterable

import fsspec
from fsspec.core import url_to_fs


class StorageError(RuntimeError):
    """An object could not be read or written; the message names it."""


def filesystem(url: str):
    """Return ``(fs, path)`` for a URL. fsspec caches filesystem instances per process."""
    return url_to_fs(str(url))


def is_local(url: str) -> bool:
    fs, _ = filesystem(url)
    return "file" in _protocols(fs)


def _protocols(fs) -> tuple:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL without touching its scheme (``gs://b/x`` + ``y`` -> ``gs://b/x/y``)."""
    url = str(url)
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return scheme + "://" + posixpath.join(rest, *parts) if rest else scheme + "://" + posixpath.join(*parts)
    return os.path.join(url, *parts)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isdir(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: no such file or object") from e
    except PermissionError as e:
        raise StorageError(f"{url}: permission denied ({e}); check the credentials' access to it") from e


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object so that a reader never sees it half written.

    Local files go to a temporary name in the same folder and are renamed over
    the target (atomic on POSIX). Object stores get one whole-object PUT from
    memory, which they publish atomically; we never stream through
    ``fs.open(..., "wb")`` because fsspec publishes a partial object when an
    exception leaves that block.
    """
    fs, path = filesystem(url)
    if "file" in _protocols(fs):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def listdir(url: str) -> list[str]:
    """Names (not full paths) of the entries directly under ``url``."""
    fs, path = filesystem(url)
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def check_writable(url: str) -> None:
    """Fail early, before any training, if the output location cannot be written."""
    probe = join(url, f".mlc-write-probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"ok")
        remove(probe)
    except Exception as e:  # noqa: BLE001 - any failure means "not writable"; we re-raise with context
        raise StorageError(f"output location {url} is not writable: {e}") from e


def read_many(urls: Iterable[str]) -> dict:
    """Fetch many small objects in one batched, concurrent call (fsspec's ``cat``).

    Returns ``{url: bytes or Exception}`` so that one bad object does not fail the rest.
    """
    urls = list(urls)
    if not urls:
        return {}
    fs, _ = filesystem(urls[0])
    paths = [filesystem(u)[1] for u in urls]
    got = fs.cat(paths, on_error="return")
    if not isinstance(got, dict):  # a single path comes back bare
        got = {paths[0]: got}
    return {u: got.get(p, FileNotFoundError(u)) for u, p in zip(urls, paths)}


__all__ = [
    "StorageError", "filesystem", "is_local", "join", "exists", "isdir", "read_bytes", "write_bytes",
    "write_text", "makedirs", "remove", "listdir", "check_writable", "read_many", "fsspec",
]
