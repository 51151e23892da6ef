"""The decode-once image store: every training image decoded and fitted into a fixed-size uint8 slot, once
per node, so later epochs, validation and every Tune trial on that node copy pixels instead of fetching and
decoding JPEGs again (on a GPU node the GPU otherwise waits for the CPUs' JPEG decoding).

**Files, so processes share it.** A store is a folder of memory-mapped files: ``pixels`` (n x side x side x 3),
``meta`` (each slot's stored and original height and width), ``state`` (0 empty, 1 stored, 2 unreadable) and
``reasons`` (why a row is unreadable). A *compact* store keeps each slot's pixels as JPEG bytes instead
(``encoded``, at most ``compact`` bytes a slot, and their ``length``: :mod:`mlc.data.slot_codec`): a tenth of
the raw bytes or less, decoded for every batch by the loader's CPUs; the form a store takes when raw pixels do
not fit. In memory it lives on ``/dev/shm`` (tmpfs: RAM, shared by every process on the node); on local disk it is a memory map the page cache serves. Ray Train workers and their
DataLoader processes on one node open the same folder and fill it together: each writes the rows it reads,
pixels and sizes before the state byte that says they are there.

**Keyed by content.** The folder's name is a hash of the image URLs in table order, each file's size and
modification stamp (:mod:`mlc.io.identity`), the slot size and the layout version: a changed table, image or
``--image-size`` opens another store, never stale pixels.

**Gone when unused.** Every process using a store holds a shared lock on its ``users`` file; the last one to
close it removes the store, unless a sweep holds ``.keep`` in the root (a Tune sweep does, so that trials
run one after another on a node reuse one store). Stores left by killed processes (no lock held) are removed
by the next run that opens the root.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid

import numpy as np

from mlc.data.slot_codec import decode_slot, encode_slot

# Bumped when the files' layout, the slot fitting or the slot encoding changes: an older store is never read as a
# newer one (3: compact slots keep 4:4:4 chroma where it fits).
VERSION = 3
EMPTY, STORED, BAD = 0, 1, 2
REASON_BYTES = 120
# Half of the memory (or disk) still available: the store must leave room for the model's host copies, the
# DataLoader processes, Ray's object store and checkpoints.
AUTO_FRACTION = 0.5


def memory_root() -> str | None:
    """Where stores in memory live: ``$MLC_STORE_MEMORY_DIR``, else /dev/shm (None where there is none)."""
    root = os.environ.get("MLC_STORE_MEMORY_DIR")
    if root:
        return root
    return f"/dev/shm/mlc-store-{os.getuid()}" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
        else None


def disk_root() -> str:
    """Where stores on local disk live: ``$MLC_STORE_DIR``, else the system's temporary folder."""
    return os.environ.get("MLC_STORE_DIR") or os.path.join(tempfile.gettempdir(), f"mlc-store-{os.getuid()}")


def _shape(n: int, side: int, compact: int | None = None) -> dict:
    images = {"pixels": ((n, side, side, 3), np.uint8)} if compact is None else \
        {"encoded": ((n, compact), np.uint8), "length": ((n,), np.int32)}
    return {**images, "meta": ((n, 4), np.int32), "state": ((n,), np.uint8), "reasons": ((n, REASON_BYTES), np.uint8)}


def nbytes(n: int, side: int, compact: int | None = None) -> int:
    return sum(int(np.prod(s)) * np.dtype(t).itemsize for s, t in _shape(n, side, compact).values())


def compact_bytes(side: int) -> int:
    """A compact slot's bytes: a tenth of its raw pixels. Re-encoded at JPEG quality 90 the real COMP5329 images
    take 16-18 KB (4:2:0-4:4:4) of the 30 KB a 320 px slot gets; a busier image is encoded at a lower quality
    until it fits. At least 2 KB: a JPEG's headers and tables alone take about 600 bytes, which a tenth of a tiny
    slot (691 bytes at 48 px) would not hold."""
    return max(2048, side * side * 3 // 10)


class ImageStore:
    """One store, opened by this process. Pickles (into DataLoader workers) without its lock: a worker is a
    child of a process that holds it."""

    def __init__(self, folder: str, n: int, side: int, fd: int | None, compact: int | None = None):
        self.folder, self.n, self.side, self._fd, self.compact = folder, n, side, fd, compact
        self._map()

    def _map(self) -> None:
        for name, (shape, dtype) in _shape(self.n, self.side, self.compact).items():
            setattr(self, name, np.memmap(os.path.join(self.folder, name), dtype=dtype, mode="r+", shape=shape))

    def __getstate__(self):
        return {"folder": self.folder, "n": self.n, "side": self.side, "_fd": None, "compact": self.compact}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._map()

    def count(self, rows=None) -> int:
        """Rows stored or known unreadable (of ``rows``, default all)."""
        s = self.state if rows is None else self.state[rows]
        return int(np.count_nonzero(s))

    def empty(self, slots) -> np.ndarray:
        """Whether each of ``slots`` is still to be decoded."""
        return self.state[slots] == EMPTY

    def unreadable(self, slots) -> np.ndarray:
        """Whether each of ``slots`` is an image that could not be decoded (:meth:`reason` says why)."""
        return self.state[slots] == BAD

    def sizes(self, slots) -> np.ndarray:
        """(stored h, stored w, original h, original w) of each of ``slots``."""
        return self.meta[slots]

    def copy_rows(self, slots, out: np.ndarray) -> None:
        """Copy the slots ``slots`` into ``out`` (len(slots), side, side, 3), several threads at once: numpy
        releases the GIL while it copies, and one thread cannot use a node's memory bandwidth."""
        n = len(slots)
        parts = min(_COPY_THREADS, max(1, n // 16))
        bounds = [n * k // parts for k in range(parts + 1)]

        def copy(k):
            for j in range(bounds[k], bounds[k + 1]):
                if self.compact is None:
                    out[j] = self.pixels[slots[j]]
                else:  # decoding releases the GIL too: the threads decode side by side
                    decode_slot(self.encoded[slots[j], :self.length[slots[j]]].tobytes(), out[j])
        if parts == 1:
            copy(0)
            return
        list(_pool().map(copy, range(parts)))

    def put(self, i: int, pixels: np.ndarray, original: tuple[int, int]) -> None:
        """Store row ``i``: ``pixels`` (h, w, 3) uint8 with h, w <= side, from an image of ``original`` (h, w).

        The slot's unused part repeats the last row and column, so sampling at the image's edge on the device
        reads edge pixels (as a resize that clamps at the border does), not black.
        """
        h, w = pixels.shape[:2]
        if self.compact is not None:
            self.put_encoded(i, encode_slot(pixels, limit=self.compact), (h, w), original)
            return
        slot = self.pixels[i]
        slot[:h, :w] = pixels
        slot[:h, w:] = pixels[:, -1:]
        slot[h:] = slot[h - 1:h]
        self.meta[i] = (h, w, original[0], original[1])
        self.state[i] = STORED  # last: a reader that sees it finds the pixels and sizes written

    def put_encoded(self, i: int, data: bytes, stored: tuple[int, int], original: tuple[int, int]) -> None:
        """Store row ``i`` from its slot's JPEG (a packed dataset's bytes): kept as they are in a compact store,
        decoded into the slot in a raw one."""
        if self.compact is None:
            decode_slot(data, self.pixels[i])
        elif len(data) <= self.compact:
            self.encoded[i, :len(data)] = np.frombuffer(data, dtype=np.uint8)
            self.length[i] = len(data)
        else:  # packed at another quality than fits this store's slots: the pixels, encoded to fit
            buf = np.empty((self.side, self.side, 3), dtype=np.uint8)
            decode_slot(data, buf)
            return self.put(i, buf[:stored[0], :stored[1]], original)
        self.meta[i] = (stored[0], stored[1], original[0], original[1])
        self.state[i] = STORED

    def image(self, i: int) -> np.ndarray:
        """Row ``i``'s stored pixels (its stored height and width, no edge fill), decoded from a compact slot."""
        h, w = (int(v) for v in self.meta[i, :2])
        if self.compact is None:
            return np.array(self.pixels[i, :h, :w])
        out = np.empty((self.side, self.side, 3), dtype=np.uint8)
        decode_slot(self.encoded[i, :self.length[i]].tobytes(), out)
        return out[:h, :w].copy()

    def put_bad(self, i: int, reason: str) -> None:
        raw = reason.encode("utf-8", "replace")[:REASON_BYTES]
        self.reasons[i] = 0
        self.reasons[i, :len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        self.state[i] = BAD

    def reason(self, i: int) -> str:
        return bytes(self.reasons[i]).rstrip(b"\0").decode("utf-8", "replace")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        """Stop using the store; the last process to stop removes it (unless a sweep keeps it)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            _remove_if_unused(self.folder, fd)
        finally:
            os.close(fd)


# Threads copying slots into a batch (a few saturate a node's memory bandwidth).
_COPY_THREADS = min(4, os.cpu_count() or 1)
_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(_COPY_THREADS, thread_name_prefix="mlc-store-copy")
    return _POOL


def _locked(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _kept(root: str) -> bool:
    """Whether a sweep holds the root's ``.keep`` lock."""
    try:
        fd = os.open(os.path.join(root, ".keep"), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        if _locked(fd, fcntl.LOCK_EX):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


def _remove_if_unused(folder: str, fd: int | None = None) -> bool:
    """Remove a store no process uses (nobody else holds its ``users`` lock) and no sweep keeps."""
    own = fd is None
    if own:
        try:
            fd = os.open(os.path.join(folder, "users"), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return False
    try:
        if not _locked(fd, fcntl.LOCK_EX) or _kept(os.path.dirname(folder)):
            return False
        # Renamed first, so that nobody opens it while it is deleted; an opener that already holds the old
        # ``users`` file sees that it is no longer the folder's and starts over.
        trash = os.path.join(os.path.dirname(folder), f".trash-{uuid.uuid4().hex}")
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True
    finally:
        if own:
            os.close(fd)


def sweep(root: str, keep: str | None = None, max_age_s: float = 3600.0) -> list[str]:
    """Remove the stores under ``root`` that no process uses (left by killed runs), except ``keep``; and
    half-made or half-deleted folders older than ``max_age_s``. Returns the names removed."""
    removed = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(root, name)
        if name.startswith((".new-", ".trash-")):
            try:
                if time.time() - os.stat(path).st_mtime > max_age_s:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(name)
            except FileNotFoundError:
                pass
        elif not name.startswith(".") and name != keep and _remove_if_unused(path):
            removed.append(name)
    return removed


def find(key: str) -> str | None:
    """The root already holding a store of ``key`` (memory first), or None."""
    for root in (memory_root(), disk_root()):
        if root and os.path.isfile(os.path.join(root, key, "users")):
            return root
    return None


def _join(final: str, n: int, side: int, compact: int | None) -> ImageStore | None:
    """Become a user of the store in the folder ``final``; None when there is none (or it was removed while we
    waited for its lock)."""
    users = os.path.join(final, "users")
    try:
        fd = os.open(users, os.O_RDONLY)
    except FileNotFoundError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        same = os.fstat(fd).st_ino == os.stat(users).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    with open(os.path.join(final, "layout.json")) as f:
        layout = json.load(f)
    want = {"version": VERSION, "n": n, "side": side, "compact": compact}
    if layout != want:
        os.close(fd)
        raise RuntimeError(f"image store {final} holds {layout}, not {want}; remove it")
    return ImageStore(final, n, side, fd, compact)


def any_present() -> bool:
    """Whether any store is on this node now: cheaper than the key of one (which stats every image)."""
    for root in (memory_root(), disk_root()):
        try:
            if root and any(not name.startswith(".") for name in os.listdir(root)):
                return True
        except OSError:  # no such folder, or not one we may list: no store of ours there
            continue
    return False


def open_existing(key: str, n: int, side: int, compact: int | None = None) -> ImageStore | None:
    """The store ``key`` if one is on this node now (memory first), opened as one more user; never creates one."""
    root = find(key)
    return _join(os.path.join(root, key), n, side, compact) if root is not None else None


def open_store(root: str, key: str, n: int, side: int, compact: int | None = None) -> ImageStore:
    """Open the store ``key`` under ``root``, creating it (empty) if no process has; safe when several
    processes on the node race to create it: exactly one folder wins and all of them use it."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    final = os.path.join(root, key)
    for _ in range(20):
        store = _join(final, n, side, compact)
        if store is not None:
            return store
        tmp = tempfile.mkdtemp(dir=root, prefix=".new-")
        for name, (shape, dtype) in _shape(n, side, compact).items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.truncate(int(np.prod(shape)) * np.dtype(dtype).itemsize)  # sparse: pages appear as rows fill
        with open(os.path.join(tmp, "layout.json"), "w") as f:
            json.dump({"version": VERSION, "n": n, "side": side, "compact": compact}, f)
        fd = os.open(os.path.join(tmp, "users"), os.O_RDONLY | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)  # held before the folder is visible: a sweep never takes a new store
        try:
            os.rename(tmp, final)  # a folder onto a non-empty folder fails: the first creator wins
        except OSError as e:
            os.close(fd)
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue
        return ImageStore(final, n, side, fd, compact)
    raise RuntimeError(f"could not open the image store {final}: it kept being removed while opening")


class Keep:
    """Hold ``.keep`` in both roots: stores stay after their last user closes them, until this is closed
    (then unused ones are removed). A Tune sweep holds it so trials on the driver's node share one store."""

    def __init__(self):
        self._fds = []

    def __enter__(self):
        for root in {memory_root(), disk_root()} - {None}:
            try:
                os.makedirs(root, mode=0o700, exist_ok=True)
                fd = os.open(os.path.join(root, ".keep"), os.O_RDONLY | os.O_CREAT, 0o600)
            except OSError:
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._fds.append((root, fd))
        return self

    def __exit__(self, *exc):
        fds, self._fds = self._fds, []
        for _, fd in fds:
            os.close(fd)
        for root, _ in fds:
            sweep(root)
        return False

