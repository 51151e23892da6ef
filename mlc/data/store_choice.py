"""Where the decode-once store of a run goes (:mod:`mlc.data.store`): in memory, on local disk, or nowhere
(stream: read and decode every epoch, as without a store), decided from what the node has free now."""

from __future__ import annotations

import os

from mlc.data.store import AUTO_FRACTION, disk_root, find, memory_root, nbytes, open_store, sweep


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


def choose(mode: str, budget: float | None, n: int, side: int, key: str) -> tuple[str | None, str]:
    """Where the store of ``n`` rows of ``side`` px goes: ``(root or None to stream, what to log)``.

    ``mode``: auto (memory when it fits the budget, else local disk when half its free space holds it, else
    stream), memory, disk, or off. ``budget``: GiB of memory; None: half of what is available now (and what
    /dev/shm has free). A store that already exists for ``key`` (another worker or trial on this node made
    it) is used wherever it is.
    """
    need = nbytes(n, side)
    what = f"{n} images at {side}x{side} px, {_gib(need)}"
    if mode == "off":
        return None, "image store: off (--store off); images are read and decoded every epoch"
    existing = find(key)
    if existing is not None and (mode == "auto" or existing == (memory_root() if mode == "memory" else disk_root())):
        where = "memory" if existing == memory_root() else "local disk"
        return existing, f"image store: in {where} ({what}), shared with the processes already using it"
    mem = memory_root()
    notes = []
    if mode in ("auto", "memory") and mem is not None:
        sweep(mem)
        limit = budget * 2**30 if budget is not None else AUTO_FRACTION * available_memory()
        limit = min(limit, free_bytes(mem))
        if need <= limit:
            return mem, (f"image store: in memory at {mem} ({what}; budget {_gib(limit)}): images are decoded in "
                         "the first epoch only")
        notes.append(f"memory budget {_gib(limit)}" + ("" if budget is not None else " (auto: half of what is free)"))
    elif mode in ("auto", "memory"):
        notes.append("no /dev/shm")
    if mode in ("auto", "disk"):
        disk = disk_root()
        sweep(disk)
        free = free_bytes(disk)
        if need <= AUTO_FRACTION * free:
            return disk, (f"image store: on local disk at {disk} ({what}; {_gib(free)} free): images are decoded in "
                          "the first epoch only" + (f"; in memory it would exceed the {notes[0]}" if notes else ""))
        notes.append(f"half of the {_gib(free)} free on {disk}")
    msg = f"image store: {what} do not fit ({', '.join(notes)})"
    if mode != "auto":
        raise ValueError(f"--store {mode}: {msg}; raise --store-budget, set MLC_STORE_DIR to a larger local disk, "
                         "or use --store auto")
    return None, (msg + "; streaming: images are read and decoded every epoch. --store-budget GIB or MLC_STORE_DIR "
                  "(a larger local disk) would let them be decoded once")


def store_key(urls: list, image_size: int) -> tuple[str, int]:
    """``(key, slot side)`` of the store of a run's labelled images (``urls``, every row of the table in order)
    at ``--image-size``: what :func:`open_for_run` opens, and what a report looks for afterwards."""
    from mlc.data.augment import slot_side
    from mlc.data.store import VERSION
    from mlc.io import identity
    side = slot_side(image_size)
    return identity.digest(list(urls), VERSION, side)[:32], side


def open_for_run(urls: list, image_size: int, mode: str, budget: float | None, log=print, *, reason_off=None):
    """The store of a run's labelled images (every row of the table, so training and validation share it),
    opened or created; None when the run streams. ``reason_off``: why the store cannot be used this run."""
    if reason_off:
        log(f"image store: off ({reason_off}); images are read and decoded every epoch")
        return None
    from mlc.data.augment import slot_side
    key, side = store_key(urls, image_size) if mode != "off" else ("", slot_side(image_size))
    root, message = choose(mode, budget, len(urls), side, key)
    if root is None:
        log(message)
        return None
    store = open_store(root, key, len(urls), side)
    done = store.count()
    if done:
        message += f"; {done} of {len(urls)} images already decoded by an earlier process on this node"
    log(message)
    return store
