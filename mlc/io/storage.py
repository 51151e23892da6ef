"""The one place that knows about URLs and filesystems.

Every other module takes URLs (a local path, ``file://``, ``gs://bucket/key``, ``memory://``, anything
fsspec opens) and calls these functions.

Google Cloud Storage goes through gcsfs with its normal credential chain (Application Default
Credentials, ``GOOGLE_APPLICATION_CREDENTIALS``, the metadata server; ``token`` and other options can
be set for every ``gs://`` URL through fsspec's configuration, e.g. ``FSSPEC_GS_TOKEN``). Nothing here
prints or logs a credential: error messages name the URL (with any user:password@ or signed-URL query
removed) and the server's message.

What this module guarantees:

* Failures name the object: a missing object raises :class:`ObjectNotFound` (a ``FileNotFoundError``),
  a refused one :class:`AccessDenied` (a ``PermissionError``), anything else :class:`StorageError`; each
  says what was being done, to which URL, and what to check.
* Transient errors (HTTP 408, 429, 5xx, dropped connections) are retried with exponential backoff by
  gcsfs itself (``gcsfs.retry.retry_request``: 6 attempts over about 30 s, on every request, reads and
  writes alike), so this module does not wrap another retry loop around it; the tests inject 503 and
  429 through a proxy to check that it happens.
* Writes never leave a partial object at the final key: the bytes are built whole in memory first
  (:func:`write_bytes`, :func:`writer`), local files are renamed over the target, and object stores get
  a single upload that they publish only when it completes (a simple upload under 50 MB, a resumable
  upload above, which GCS publishes on its last chunk). Streaming through ``fs.open(url, "wb")`` would
  not be safe: fsspec publishes what was written so far when an exception leaves that ``with`` block.
* Filesystem objects belong to one process (:func:`filesystem`): a forked DataLoader worker builds its own
  client instead of sharing the parent's sockets and event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import os
import posixpath
import re
import tempfile
import uuid
from typing import Iterable, Iterator

# gcsfs >= 2025 otherwise swaps in an experimental "zonal / hierarchical namespace" class that probes a gRPC API
# on each bucket's first call (60 s or more off the real service); set before fsspec imports gcsfs (lazily).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402
from fsspec.core import url_to_fs  # noqa: E402

# Object stores have no real folders: nothing to create before writing (gcsfs's makedirs would even
# create a missing *bucket*, turning a typo in --output into a new bucket).
_OBJECT_STORES = {"gs", "gcs", "s3", "s3a", "az", "abfs", "abfss", "adl", "oss", "memory"}
_GCS = {"gs", "gcs"}
DEFAULT_CONCURRENCY = 32


class StorageError(RuntimeError):
    """An object could not be read or written; the message names it and says what to check."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object (or its bucket) does not exist."""


class AccessDenied(StorageError, PermissionError):
    """The credentials in use may not read or write the object."""


_CREDENTIALS_HINT = ("check that the credentials in use (Application Default Credentials from `gcloud auth "
                     "application-default login`, GOOGLE_APPLICATION_CREDENTIALS, or the VM's service account) "
                     "have access to it")


def safe_url(url) -> str:
    """The URL for messages: any ``user:password@`` and query string (signed URLs carry keys there) removed."""
    url = str(url)
    url = re.sub(r"^([a-zA-Z][\w+.-]*://)[^/@]*@", r"\1", url)
    return url.split("?", 1)[0] if "://" in url else url


_fs_cache: dict = {}


def filesystem(url: str):
    """Return ``(fs, path)`` for a URL; one filesystem per protocol and process (built after a fork)."""
    url = str(url)
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    key = (os.getpid(), protocol)
    fs = _fs_cache.get(key)
    if fs is None:
        options = {}
        if protocol in _GCS:
            # Listings not cached: another process (a Ray or loader worker) may have written since; mlc lists rarely.
            options["use_listings_cache"] = False
        fs, path = url_to_fs(url, **options)
        if "::" not in url:  # a chained URL ("simplecache::gs://...") configures its own instance each time
            _fs_cache[key] = fs
        return fs, path
    return fs, fs._strip_protocol(url)


def _protocols(fs) -> tuple:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def is_local(url: str) -> bool:
    fs, _ = filesystem(url)
    return "file" in _protocols(fs) or "local" in _protocols(fs)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL without touching its scheme (``gs://b/x`` + ``y`` -> ``gs://b/x/y``)."""
    url = str(url)
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return scheme + "://" + posixpath.join(rest, *parts) if rest else scheme + "://" + posixpath.join(*parts)
    return os.path.join(url, *parts)


def _http_code(e: BaseException):
    code = getattr(e, "code", None) or getattr(e, "status", None)
    return code if isinstance(code, int) else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # gcsfs's 403 message is "Forbidden: <request URL>\n<server message>": the server message says more.
    if len(lines) > 1 and lines[0].startswith("Forbidden"):
        return lines[-1][:300]
    return (lines[0] if lines else type(e).__name__)[:300]


def _named(url: str, e: BaseException, action: str) -> BaseException:
    """Turn a filesystem exception into one of ours that names the object and says what to do."""
    if isinstance(e, StorageError):
        return e
    shown = safe_url(url)
    code = _http_code(e)
    if isinstance(e, FileNotFoundError) or code == 404:
        return ObjectNotFound(f"{shown}: no such file or object (while trying to {action} it); check the URL "
                              "and that the bucket exists")
    if isinstance(e, PermissionError) or code in (401, 403) or (
            isinstance(e, OSError) and str(e).startswith("Forbidden")):
        return AccessDenied(f"{shown}: permission denied while trying to {action} it ({_first_line(e)}); "
                            + _CREDENTIALS_HINT)
    detail = f"HTTP {code}: {_first_line(e)}" if code else f"{type(e).__name__}: {_first_line(e)}"
    retried = " (transient errors were retried with backoff and kept failing)" if code and (
        code in (408, 429) or code >= 500) else ""
    return StorageError(f"{shown}: could not {action} it ({detail}){retried}")


def _ask(url: str, question: str) -> bool:
    fs, path = filesystem(url)
    try:
        return getattr(fs, question)(path)
    except Exception as e:  # noqa: BLE001 - fsspec's exists() swallows most errors; what is left names nothing
        raise _named(url, e, "check for") from e


def exists(url: str) -> bool:
    return _ask(url, "exists")


def isdir(url: str) -> bool:
    return _ask(url, "isdir")


def read_bytes(url: str) -> bytes:
    """The whole object. Missing: :class:`ObjectNotFound` (a FileNotFoundError) naming it."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except IsADirectoryError as e:
        raise StorageError(f"{safe_url(url)}: is a folder, not a file") from e
    except Exception as e:  # noqa: BLE001 - re-raised with the object's name
        raise _named(url, e, "read") from e


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` (exclusive) of an object in one ranged request (fewer where it ends sooner)."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path, start=start, end=end)
    except Exception as e:  # noqa: BLE001 - re-raised with the object's name
        raise _named(url, e, "read") from e


class PendingReads:
    """Reads started by :func:`start_reads`; iterate to get ``(url, bytes or exception)`` as each completes.

    One bad object does not fail the rest: its value is the named exception (:class:`ObjectNotFound`,
    :class:`AccessDenied`, :class:`StorageError`) for the caller to raise or skip. On an asynchronous
    filesystem (gcsfs, http) the requests are already in flight on the filesystem's event loop when this
    object is returned, so a caller can start the next batch's reads and then decode the current one;
    objects on other filesystems are read one by one when iteration reaches them (a local disk is not
    helped by more). Iterate once; ``cancel()`` drops what is still pending.
    """

    def __init__(self, urls: list, concurrency: int):
        self.urls = urls
        self._futures: dict = {}
        self._sync: list = []
        semaphores: dict = {}
        for u in urls:
            fs, path = filesystem(u)
            if not (getattr(fs, "async_impl", False) and hasattr(fs, "_cat_file")):
                self._sync.append((u, fs, path))
                continue
            # One limit per filesystem: each has its own event loop and connection pool.
            sem = semaphores.setdefault(id(fs), asyncio.Semaphore(max(1, concurrency)))
            self._futures[asyncio.run_coroutine_threadsafe(_cat_limited(fs, path, sem), fs.loop)] = u

    def __iter__(self) -> Iterator[tuple]:
        try:
            for fut in concurrent.futures.as_completed(self._futures):
                u = self._futures[fut]
                try:
                    yield u, fut.result()
                except Exception as e:  # noqa: BLE001 - yielded, named
                    yield u, _named(u, e, "read")
            for u, fs, path in self._sync:
                try:
                    yield u, fs.cat_file(path)
                except Exception as e:  # noqa: BLE001 - yielded, named
                    yield u, _named(u, e, "read")
        finally:
            self.cancel()

    def cancel(self) -> None:
        for fut in self._futures:
            fut.cancel()


async def _cat_limited(fs, path: str, sem: asyncio.Semaphore) -> bytes:
    async with sem:
        return await fs._cat_file(path)


def start_reads(urls: Iterable[str], concurrency: int = DEFAULT_CONCURRENCY) -> PendingReads:
    """Start reading every URL now (up to ``concurrency`` requests in flight per filesystem; each URL once);
    see :class:`PendingReads`. The one batch read: :func:`read_many`, :mod:`mlc.io.fetch` and the dataset
    check all go through it."""
    return PendingReads(list(dict.fromkeys(str(u) for u in urls)), concurrency)


def read_many(urls: Iterable[str], concurrency: int = DEFAULT_CONCURRENCY) -> dict:
    """``{url: bytes or exception}`` for every URL, read concurrently (:func:`start_reads`), once all are in."""
    return dict(start_reads(urls, concurrency))


def umask() -> int:
    """This process's umask, read without changing it where Linux shows it (``os.umask`` can only be read by
    setting it, which would briefly change it for every other thread)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, ValueError, StopIteration):
        old = os.umask(0o022)
        os.umask(old)
        return old


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object so that a reader never sees it half written.

    Local files go to a temporary name in the same folder and are renamed over the target (atomic on
    POSIX). Object stores get one upload of bytes already complete in memory, which they publish
    atomically on success; on failure the previous object, if any, is untouched.
    """
    data = bytes(data) if not isinstance(data, bytes) else data
    fs, path = filesystem(url)
    if "file" in _protocols(fs) or "local" in _protocols(fs):
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        except OSError as e:
            raise _named(url, e, "write") from e
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # mkstemp makes the file 0600; the output gets the mode a plain open() would give it.
            os.chmod(tmp, 0o666 & ~umask())
            os.replace(tmp, path)
        except BaseException as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise _named(url, e, "write") from e
            raise
        return
    try:
        if not set(_protocols(fs)) & _OBJECT_STORES:
            parent = posixpath.dirname(path)
            if parent:
                fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)
    except Exception as e:  # noqa: BLE001 - re-raised with the object's name
        raise _named(url, e, "write") from e


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


@contextlib.contextmanager
def writer(url: str) -> Iterator[io.BytesIO]:
    """``with writer(url) as f: torch.save(obj, f)``: the object is published whole when the block ends
    normally, and not at all when it raises (unlike ``fs.open(url, "wb")``)."""
    buf = io.BytesIO()
    yield buf
    write_bytes(url, buf.getvalue())


def remove(url: str, recursive: bool = False) -> None:
    """Remove a file, or a folder / prefix with ``recursive``; nothing there is fine."""
    fs, path = filesystem(url)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001
        raise _named(url, e, "delete") from e


def _ls(url: str, detail: bool) -> tuple[str, list]:
    fs, path = filesystem(url)
    try:
        return path.rstrip("/"), fs.ls(path, detail=detail)
    except Exception as e:  # noqa: BLE001
        raise _named(url, e, "list") from e


def listdir(url: str) -> list[str]:
    """Names (not full paths) of the entries directly under ``url``."""
    base, entries = _ls(url, False)
    return sorted({posixpath.basename(p.rstrip("/")) for p in entries if p.rstrip("/") != base})


def sizes(url: str) -> dict:
    """``{name: bytes}`` of the files directly under ``url``: one listing."""
    return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in _ls(url, True)[1]
            if e.get("type") == "file"}


def check_writable(url: str) -> None:
    """Fail early, before any training, if the output location cannot be written.

    Writes a small marker object under ``url``, overwrites it (a run rewrites metrics.json and its
    checkpoint every epoch, which on GCS needs delete permission as well as create) and deletes it.
    """
    probe = join(url, f".mlc-write-probe-{uuid.uuid4().hex}")
    created = None
    try:
        if is_local(url):
            folder = os.path.abspath(filesystem(url)[1])
            if os.path.exists(folder) and not os.path.isdir(folder):
                raise StorageError(f"{folder} is a file, not a folder")
            # The top folder this check creates, removed again below: a run that fails before writing
            # anything leaves no empty folder behind (its outputs create the folder when they are written).
            created = None if os.path.exists(folder) else folder
            while created and not os.path.exists(os.path.dirname(created)):
                created = os.path.dirname(created)
        write_bytes(probe, b"mlc write probe\n")
        write_bytes(probe, b"mlc write probe, overwritten\n")
        fs, path = filesystem(probe)
        fs.rm(path)
        if created:
            _remove_empty_folders(folder, created)
    except Exception as e:  # noqa: BLE001 - any failure means "not writable"; re-raised with context
        reason = str(e) if isinstance(e, StorageError) else f"{type(e).__name__}: {_first_line(e)}"
        hint = ("the bucket must exist and the credentials need storage.objects.create, .delete and .get on "
                "it (roles/storage.objectUser)") if url.startswith(("gs://", "gcs://")) else \
            "choose a folder this user can create files in"
        raise StorageError(f"output location {safe_url(url)} is not writable: {reason}. Nothing was trained; "
                           f"{hint}, or choose another --output.") from e


def _remove_empty_folders(folder: str, top: str) -> None:
    """Remove ``folder`` and its parents up to ``top`` while they are empty."""
    while True:
        try:
            os.rmdir(folder)
        except OSError:
            return
        if folder == top:
            return
        folder = os.path.dirname(folder)


__all__ = [
    "StorageError", "ObjectNotFound", "AccessDenied", "filesystem", "is_local", "join", "exists", "isdir",
    "read_bytes", "read_range", "read_many", "start_reads", "PendingReads", "write_bytes", "write_text", "writer", "remove",
    "listdir", "sizes", "check_writable", "safe_url", "fsspec", "DEFAULT_CONCURRENCY", "umask",
]
