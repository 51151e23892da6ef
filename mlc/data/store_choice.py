"""Where the decode-once store of a run goes (:mod:`mlc.data.store`): in memory, on local disk, or nowhere
(stream: read and decode every epoch, as without a store), decided from what the node has free now."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

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


def choose(mode: str, budget: float | None, n: int, side: int, keys: dict, *, decoders: int = 1
           ) -> tuple[str | None, int | None, str]:
    """Where the store of ``n`` rows of ``side`` px goes and in which form: ``(root or None to stream, compact
    bytes a slot or None for raw pixels, what to log)``.

    ``mode``: auto (memory, else local disk when half its free space holds it, else stream), memory, disk, or
    off. In each place raw pixels are tried first (no decoding per batch), then the compact form (JPEG slots,
    a tenth of the raw bytes or less, decoded by the loader's CPUs). Raw in memory wins wherever it fits, since it
    costs neither decoding nor disk reads; compact wins over streaming wherever it fits, since a slot JPEG decodes
    as fast as the original or faster (docs/measurements-pack.md) and costs no storage request. Where memory holds
    only the compact form and the local disk holds raw pixels, the two rates decide (:func:`_by_rate`): the
    ``decoders`` loader processes' slot decoding, measured here, against raw slots read from that disk, measured
    there. ``budget``: GiB of memory; None: half of what is available now (and what /dev/shm has free). A store
    that already exists (``keys``: its key for each form; another worker or trial on this node made it) is used
    wherever it is.
    """
    if mode == "off":
        return None, None, "image store: off (--store off); images are read and decoded every epoch"
    compact = compact_bytes(side)
    existing = _existing(mode, keys, n, side, compact)
    if existing is not None:
        return existing
    places, notes = _places(mode, budget)
    fits = []  # (where, root, form, slot, room), in the order above
    for where, root, room in places:
        fits += [(where, root, form, slot, room) for form, slot in (("raw", None), ("compact", compact))
                 if nbytes(n, side, slot) <= room]
        if not any(f[0] == where for f in fits):
            notes.append(f"{where}: {_gib(room)} holds neither {_gib(nbytes(n, side))} raw nor "
                         f"{_gib(nbytes(n, side, compact))} compact")
    if fits:
        where, root, form, slot, room = fits[0]
        said = _said(form, where, root, n, side, nbytes(n, side, slot), room, notes)
        disk_raw = [f for f in fits if f[0] == "local disk" and f[2] == "raw"]
        if (where, form) == ("memory", "compact") and disk_raw:
            use_disk, why = _decided(disk_raw[0][1], keys.get("raw", "none"),
                                     lambda: _by_rate(side, decoders, disk_raw[0][1]))
            if use_disk:
                where, root, form, slot, room = disk_raw[0]
                said = _said(form, where, root, n, side, nbytes(n, side), room, notes)
            said += f"; {why}"
        return root, slot, said
    msg = f"image store: {n} images at {side}x{side} px do not fit ({'; '.join(notes)})"
    if mode != "auto":
        raise ValueError(f"--store {mode}: {msg}; raise --store-budget, set MLC_STORE_DIR to a larger local disk, "
                         "or use --store auto")
    return None, None, (msg + "; streaming: images are read and decoded every epoch. --store-budget GIB or "
                        "MLC_STORE_DIR (a larger local disk) would let them be decoded once")


def _existing(mode: str, keys: dict, n: int, side: int, compact: int):
    """:func:`choose`'s answer for a store of ``keys`` already on this node where ``mode`` allows it, else None."""
    for form, key in keys.items():
        existing = find(key)
        if existing is not None and (mode == "auto" or existing == (memory_root() if mode == "memory" else disk_root())):
            where = "memory" if existing == memory_root() else "local disk"
            size = nbytes(n, side, compact if form == "compact" else None)
            return existing, (compact if form == "compact" else None), \
                f"image store: {form}, in {where} ({n} images, {_gib(size)}), shared with the processes already using it"
    return None


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


def _by_rate(side: int, decoders: int, disk: str) -> tuple[bool, str]:
    """Whether raw pixels on the local disk ``disk`` feed the loader faster than compact slots in memory decoded by
    ``decoders`` processes, and the two rates in words. Which wins depends on the node: a fast NVMe disk beside
    few CPUs favours raw, many CPUs or a network disk favour compact (a 224 px run's raw slot is 300 KB: 1 GB/s
    reads 3,300 a second, while one core decodes 1,300-3,300 slot JPEGs, docs/measurements-pack.md)."""
    compact = decode_rate(side) * max(1, decoders)
    raw = disk_read_rate(disk, nbytes(1, side, None)) / nbytes(1, side, None)
    use_disk = raw > compact
    return use_disk, (f"{'raw on local disk' if use_disk else 'compact in memory'} chosen by rate: raw slots read "
                      f"from {disk} at about {raw:.0f} images/s, compact slots decoded at about {compact:.0f} "
                      f"images/s by {max(1, decoders)} loader process(es)")


def _decided(disk: str, key: str, decide) -> tuple[bool, str]:
    """``decide()``'s answer, made once a node for the store ``key``: the first process to decide records it in
    ``disk`` (create-only) and later ones (the node's other ranks, later trials) follow it, so that two processes
    of one node never build both stores from two noisy measurements."""
    path = os.path.join(disk, f".choice-{key}.json")
    for _ in range(2):
        try:
            with open(path) as f:
                use_disk, why = json.load(f)
            return bool(use_disk), f"{why} (decided by an earlier process on this node)"
        except (FileNotFoundError, ValueError):
            pass
        use_disk, why = decide()
        os.makedirs(disk, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=disk, prefix=".new-choice-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump([use_disk, why], f)
            os.link(tmp, path)  # create-only: a racer that recorded first wins, and this one reads its choice
            return use_disk, why
        except FileExistsError:
            continue
        except OSError:  # a disk without hard links: this process's own choice, unrecorded
            return use_disk, why
        finally:
            os.unlink(tmp)
    return use_disk, why


_DISK_RATES: dict = {}


def disk_read_rate(root: str, chunk: int, total: int = 32 * 2**20) -> float:
    """Bytes a second read from ``root``'s disk in ``chunk``-byte pieces at shuffled offsets (as a store's slots are
    read), measured once per process on a file written there, its pages dropped from the cache first (so the disk
    is measured, not memory), then removed."""
    if root not in _DISK_RATES:
        import time
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, f".read-rate-{os.getpid()}")
        count = max(1, total // chunk)
        try:
            with open(path, "wb") as f:
                f.write(os.urandom(chunk) * count)
                f.flush()
                os.fsync(f.fileno())
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                order = np.random.default_rng(0).permutation(count)
                t = time.perf_counter()
                for i in order:
                    os.pread(fd, chunk, int(i) * chunk)
                _DISK_RATES[root] = count * chunk / (time.perf_counter() - t)
            finally:
                os.close(fd)
        finally:
            if os.path.exists(path):
                os.remove(path)
    return _DISK_RATES[root]


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
                 key: str | None = None, decoders: int = 1):
    """The store of a run's labelled images (every row of the table, so training and validation share it),
    opened or created; None when the run streams. ``reason_off``: why the store cannot be used this run.
    ``key``: see :func:`store_keys`. ``decoders``: the processes that decode a batch (the loader's workers, or
    the training process itself), for :func:`choose`."""
    from mlc.data.augment import slot_side
    if reason_off:
        log(f"image store: off ({reason_off}); images are read and decoded every epoch")
        return None
    keys, side = store_keys(urls, image_size, key) if mode != "off" else ({}, slot_side(image_size))
    root, compact, message = choose(mode, budget, len(urls), side, keys, decoders=decoders)
    if root is None:
        log(message)
        return None
    store = open_store(root, keys["raw" if compact is None else "compact"], len(urls), side, compact)
    done = store.count()
    if done:
        message += f"; {done} of {len(urls)} images already decoded by an earlier process on this node"
    log(message)
    return store
