"""Where the decode-once store of a run goes (:mod:`mlc.data.store`): in memory, on local disk, or nowhere
(stream: read and decode every epoch, as without a store), decided from what the node has free now."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from mlc.data.store import AUTO_FRACTION, compact_bytes, disk_root, find, memory_root, nbytes, open_store, sweep


def available_memory() -> int:
    """Bytes this process's node can still give: MemAvailable, narrowed by a cgroup (container) limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                avail = min(avail, int(limit) - int(f.read()))
    except (OSError, ValueError):
        pass
    return max(0, avail)


def free_bytes(root: str) -> int:
    """Free bytes on the filesystem ``root`` is (or would be) on."""
    path = root
    while not os.path.exists(path):
        path = os.path.dirname(path) or "/"
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _gib(b: float) -> str:
    return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def choose(mode: str, budget: float | None, n: int, side: int, keys: dict) -> tuple[str | None, int | None, str]:
    """Where the store of ``n`` rows of ``side`` px goes and in which form: ``(root or None to stream, compact
    bytes a slot or None for raw pixels, what to log)``.

    ``mode``: auto (memory, else local disk when half its free space holds it, else stream), memory, disk, or
    off. In each place raw pixels are tried first (no decoding per batch), then the compact form (JPEG slots,
    a tenth of the raw bytes or less, decoded by the loader's CPUs). Raw wins wherever it fits, since it costs no
    decoding; compact wins over streaming wherever it fits, since a slot JPEG decodes several times faster than
    the original (docs/measurements-pack.md) and costs no storage request. The measured decode rate is said with
    a compact choice, so a user sees what the loader's CPUs can feed. ``budget``: GiB of memory; None: half of what is
    available now (and what /dev/shm has free). A store that already exists (``keys``: its key for each form;
    another worker or trial on this node made it) is used wherever it is.
    """
    if mode == "off":
        return None, None, "image store: off (--store off); images are read and decoded every epoch"
    compact = compact_bytes(side)
    for form, key in keys.items():
        existing = find(key)
        if existing is not None and (mode == "auto" or existing == (memory_root() if mode == "memory" else disk_root())):
            where = "memory" if existing == memory_root() else "local disk"
            size = nbytes(n, side, compact if form == "compact" else None)
            return existing, (compact if form == "compact" else None), \
                f"image store: {form}, in {where} ({n} images, {_gib(size)}), shared with the processes already using it"
    places, notes = _places(mode, budget)
    for where, root, room in places:
        for form, slot in (("raw", None), ("compact", compact)):
            size = nbytes(n, side, slot)
            if size <= room:
                return root, slot, _said(form, where, root, n, side, size, room, notes)
        notes.append(f"{where}: {_gib(room)} holds neither {_gib(nbytes(n, side))} raw nor "
                     f"{_gib(nbytes(n, side, compact))} compact")
    msg = f"image store: {n} images at {side}x{side} px do not fit ({'; '.join(notes)})"
    if mode != "auto":
        raise ValueError(f"--store {mode}: {msg}; raise --store-budget, set MLC_STORE_DIR to a larger local disk, "
                         "or use --store auto")
    return None, None, (msg + "; streaming: images are read and decoded every epoch. --store-budget GIB or "
                        "MLC_STORE_DIR (a larger local disk) would let them be decoded once")


def _places(mode: str, budget: float | None) -> tuple[list, list]:
    """``[(name, root, bytes it may take)]`` to try in order, and notes on the places that cannot be used."""
    places, notes = [], []
    mem = memory_root()
    if mode in ("auto", "memory") and mem is not None:
        sweep(mem)
        limit = budget * 2**30 if budget is not None else AUTO_FRACTION * available_memory()
        places.append(("memory", mem, min(limit, free_bytes(mem))))
    elif mode in ("auto", "memory"):
        notes.append("no /dev/shm")
    if mode in ("auto", "disk"):
        disk = disk_root()
        sweep(disk)
        places.append(("local disk", disk, AUTO_FRACTION * free_bytes(disk)))
    return places, notes


def _said(form: str, where: str, root: str, n: int, side: int, size: int, room: float, notes: list) -> str:
    said = (f"image store: {form}, in {where} at {root} ({n} images at {side}x{side} px, {_gib(size)}; room "
            f"{_gib(room)}): images are decoded in the first epoch only")
    if form == "compact":
        said += (f", then each batch's JPEG slots are decoded by the loader (about {decode_rate(side):.0f} "
                 f"images/s a core here; raw pixels, {_gib(nbytes(n, side))}, do not fit)")
    return said + (f" ({'; '.join(notes)})" if notes else "")


_RATES: dict = {}


def decode_rate(side: int) -> float:
    """Images a second one core decodes from compact slots of ``side`` px, measured once in this process on a
    synthetic photo-like slot (smooth shapes and noise: about the real images' bytes at quality 90)."""
    if side not in _RATES:
        import time

        from mlc.data.slot_codec import decode_slot, encode_slot
        rng = np.random.default_rng(0)
        base = np.kron(rng.integers(0, 256, (side // 16 + 1, side // 16 + 1, 3)), np.ones((16, 16, 1)))
        pixels = np.clip(base[:side, :side] + rng.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
        data, out = encode_slot(pixels), np.empty((side, side, 3), dtype=np.uint8)
        t = time.perf_counter()
        for _ in range(10):
            decode_slot(data, out)
        _RATES[side] = 10 / (time.perf_counter() - t)
    return _RATES[side]


def store_keys(urls: list, image_size: int, key: str | None = None) -> tuple[dict, int]:
    """``({"raw": key, "compact": key}, slot side)`` of the store of a run's labelled images (``urls``, every row of
    the table in order) at ``--image-size``: what :func:`open_for_run` opens, and what a report looks for
    afterwards. ``key``: what the images are, when the caller knows (a pack's source key); else the files' sizes
    and stamps say."""
    from mlc.data.augment import slot_side
    from mlc.data.store import VERSION
    from mlc.io import identity
    side = slot_side(image_size)
    if key is not None:
        base = hashlib.sha256(repr((list(urls), key, VERSION, side)).encode()).hexdigest()
    else:
        base = identity.digest(list(urls), VERSION, side)
    return {"raw": base[:32], "compact": base[:31] + "c"}, side


def open_for_run(urls: list, image_size: int, mode: str, budget: float | None, log=print, *, reason_off=None,
                 key: str | None = None):
    """The store of a run's labelled images (every row of the table, so training and validation share it),
    opened or created; None when the run streams. ``reason_off``: why the store cannot be used this run.
    ``key``: see :func:`store_keys`."""
    from mlc.data.augment import slot_side
    if reason_off:
        log(f"image store: off ({reason_off}); images are read and decoded every epoch")
        return None
    keys, side = store_keys(urls, image_size, key) if mode != "off" else ({}, slot_side(image_size))
    root, compact, message = choose(mode, budget, len(urls), side, keys)
    if root is None:
        log(message)
        return None
    store = open_store(root, keys["raw" if compact is None else "compact"], len(urls), side, compact)
    done = store.count()
    if done:
        message += f"; {done} of {len(urls)} images already decoded by an earlier process on this node"
    log(message)
    return store
