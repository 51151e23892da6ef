"""Packed datasets against one object per image, measured side by side (``jobs/bench.py --pack``): storage
requests and images/s of a first epoch through a GCS proxy, store bytes per image raw and compact, decode rates of
the original JPEGs and of the packed slots, pack throughput, and how long opening a large pack takes.

The first epoch here is the data path alone: every labelled row read, decoded and put in the store in batches, as
training's first epoch does before any model step (the store is what later epochs and validation read)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from mlc.config import TrainConfig
from mlc.io import storage
from mlc.bench.seeds import mean_se

BATCH = 64


def _memory() -> str | None:
    """Stores in RAM (/dev/shm) as a run's are, in a folder of the benchmark's own."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def first_epoch(data: str, image_size: int, count) -> dict:
    """Every labelled row of ``data`` through the run's sources into a fresh store; ``count()``: the proxy's
    requests so far."""
    from mlc.data.run_data import open_sources, prepare_data
    with tempfile.TemporaryDirectory(prefix="mlc-bench-store-", dir=_memory()) as root:
        os.environ["MLC_STORE_MEMORY_DIR"] = root
        before, start = count(), time.perf_counter()
        cfg = TrainConfig(data=data, inputs="image", image_size=image_size, weights="none", store="memory",
                          loader_workers=0)
        run = prepare_data(cfg, lambda *_: None)
        sources = open_sources(cfg, run, lambda *_: None)
        store = sources[2]
        try:
            for source in sources[:2]:  # a pack's rows are stored already; a folder's are read batch by batch
                source.set_epoch(0, 0)
                for k in range(0, len(source), BATCH):
                    source.batch(list(range(k, min(k + BATCH, len(source)))))
            seconds = time.perf_counter() - start
            n = len(run.urls)
            return {"images": n, "requests": count() - before, "seconds": seconds, "img_s": n / seconds,
                    "stored": int(store.count())}
        finally:
            store.close()
            del os.environ["MLC_STORE_MEMORY_DIR"]


def decode_rates(folder: Path, names: list, pack: str, repeats: int = 3) -> dict:
    """Images a second one core decodes: the original files (mlc's decoder, fitted to the slot as the store does)
    and the pack's slot JPEGs."""
    import torch

    from mlc.data.augment import fit_to_slot
    from mlc.data.pack import TABLES, open_pack, read_shard
    from mlc.data.slot_codec import decode_slot
    from mlc.io.images import decode_image
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = open_pack(pack)
        originals = [(folder / n).read_bytes() for n in names]
        slots = [v for t in TABLES for k in range(len(p.shards(t)))
                 for v in read_shard(p, t, k, columns=["image"]).column("image").to_pylist() if v][: len(names)]
        out = np.empty((p.side, p.side, 3), dtype=np.uint8)

        def originals_pass():
            for k, data in enumerate(originals):
                fit_to_slot(decode_image(data, names[k], draft=p.side), p.side)

        def slots_pass():
            for data in slots:
                decode_slot(data, out)
        rates = {}
        for name, fn, n in (("original JPEGs, decoded and fitted", originals_pass, len(originals)),
                            ("packed slot JPEGs, decoded", slots_pass, len(slots))):
            best = min(_timed(fn) for _ in range(repeats))
            rates[name] = n / best
        return rates
    finally:
        torch.set_num_threads(threads)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def store_bytes(pack: str, image_size: int) -> dict:
    """Bytes per image of the raw and the compact store of the pack's labelled rows: as laid out, and as
    allocated once filled (files are sparse: a compact slot's unused tail takes no page)."""
    from mlc.data.run_data import open_sources, prepare_data
    out = {}
    for form, budget in (("raw", None), ("compact", _compact_budget(pack, image_size))):
        with tempfile.TemporaryDirectory(prefix="mlc-bench-store-", dir=_memory()) as root:
            os.environ["MLC_STORE_MEMORY_DIR"], os.environ["MLC_STORE_DIR"] = root, root + "/disk"
            # memory: under auto the local disk's raw store could win by rate (store_choice.choose)
            cfg = TrainConfig(data=pack, inputs="image", image_size=image_size, weights="none", store="memory",
                              store_budget=budget, loader_workers=0)
            run = prepare_data(cfg, lambda *_: None)
            _, _, store = open_sources(cfg, run, lambda *_: None)
            try:
                files = [Path(store.folder) / f for f in os.listdir(store.folder)]
                n = store.n
                out[form] = {"laid_out": sum(f.stat().st_size for f in files) / n,
                             "allocated": sum(f.stat().st_blocks * 512 for f in files) / n,
                             "compact": store.compact is not None}
            finally:
                store.close()
                for k in ("MLC_STORE_MEMORY_DIR", "MLC_STORE_DIR"):
                    del os.environ[k]
    return out


def compact_budget(n: int, image_size: int) -> float:
    """A memory budget (GiB) that the compact store of ``n`` rows fits and their raw pixels do not."""
    from mlc.data.augment import slot_side
    from mlc.data.store import compact_bytes, nbytes
    side = slot_side(image_size)
    return (nbytes(n, side, compact_bytes(side)) * 1.05) / 2**30


def _compact_budget(pack: str, image_size: int) -> float:
    from mlc.data.pack import open_pack
    return compact_budget(open_pack(pack).rows("train"), image_size)


def manifest_read(root: str) -> dict:
    """Seconds to open the pack at ``root`` as a run does before its first step: the manifest, both tables, and
    every ImageID located in it."""
    from mlc.data.pack import TABLES, open_pack, read_frame
    from mlc.data.pack_source import locate_ids
    start = time.perf_counter()
    p = open_pack(root)
    ids = [i for t in TABLES for i in read_frame(p, t).ImageID]
    located = locate_ids(p, ids)
    return {"rows": len(located.ids), "shards": sum(len(p.shards(t)) for t in TABLES),
            "seconds": time.perf_counter() - start, "manifest_bytes": len(storage.read_bytes(storage.join(root, "manifest.json")))}


def quality_sweep(folder: Path, names: list, side: int, qualities=(75, 85, 90, 95)) -> list:
    """For each JPEG quality: mean bytes of a slot, mean absolute error against its raw pixels (grey levels), and
    slots decoded a second by one core. The originals are fitted to ``side`` px slots first, as packing does."""
    import torch

    from mlc.data.augment import fit_to_slot
    from mlc.data.slot_codec import decode_slot, encode_slot
    from mlc.io.images import decode_image
    pixels = [np.asarray(fit_to_slot(decode_image((folder / n).read_bytes(), n, draft=side), side)) for n in names]
    out = np.empty((side, side, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for q in qualities:
            data = [encode_slot(p, q) for p in pixels]
            err = []
            for d, p in zip(data, pixels):
                h, w = decode_slot(d, out)
                err.append(np.abs(out[:h, :w].astype(np.int16) - p).mean())
            seconds = min(_timed(lambda: [decode_slot(d, out) for d in data]) for _ in range(2))
            rows.append({"quality": q, "bytes": float(np.mean([len(d) for d in data])), "error": float(np.mean(err)),
                         "decode_img_s": len(data) / seconds})
    finally:
        torch.set_num_threads(threads)
    return rows


def f1_pairs(source: str, pack: str, image_size: int, seeds, output: str, settings: dict, log=print) -> list[dict]:
    """Best validation samples F1 of the same run (``settings``, one seed at a time) from ``source`` through a raw
    store and from its JPEG ``pack`` through a compact store (a budget only the compact store fits): paired by
    seed, since this from-scratch network's F1 moves more between seeds than between stores."""
    from mlc.train.driver import fit
    rows = []
    for seed in seeds:
        row = {"seed": seed}
        for name, data, budget in (("raw", source, None), ("compact", pack, _compact_budget(pack, image_size))):
            cfg = TrainConfig(**{**settings, "data": data, "image_size": image_size, "seed": seed, "store": "memory",
                                 "store_budget": budget, "output": storage.join(output, f"{name}_s{seed}")})
            row[name] = fit(cfg, fresh=True, log=lambda *_: None, progress=False)["best"]["f1_samples"]
        rows.append(row)
        log(f"seed {seed}: samples F1 raw {row['raw']:.4f}, compact {row['compact']:.4f}")
    return rows


def paired_summary(rows: list[dict]) -> dict:
    """Mean of each side, and the paired difference (compact - raw) with its standard error over seeds."""
    raw, compact = (np.array([r[k] for r in rows]) for k in ("raw", "compact"))
    diff, se = mean_se(compact - raw)
    return {"seeds": len(raw), "raw": float(raw.mean()), "compact": float(compact.mean()), "diff": diff, "diff_se": se}


def demo_f1_pairs(seeds, image_size: int, log=print) -> tuple[list[dict], dict]:
    """:func:`f1_pairs` on the demo set with the demo's settings, packed at ``image_size`` into a temporary
    folder: the rows, and their :func:`paired_summary`."""
    from mlc.data.demo import DEMO_DEFAULTS, make_demo_dataset
    from mlc.data.pack_write import PackConfig, pack_in_process
    source = str(make_demo_dataset())
    with tempfile.TemporaryDirectory(prefix="mlc-bench-f1-") as tmp:
        pack_in_process(PackConfig(data=source, output=f"{tmp}/pack", image_size=image_size), log=lambda *_: None)
        settings = {k: v for k, v in DEMO_DEFAULTS.items() if k not in ("output", "seed", "image_size")}
        rows = f1_pairs(source, f"{tmp}/pack", image_size, seeds, f"{tmp}/runs", settings, log=log)
    return rows, paired_summary(rows)


def present_images_source(real: Path, root: Path, copies: int = 1) -> tuple[Path, Path]:
    """The real tables in ``real`` cut to the rows whose image is in ``real/images``, written to ``root`` (else the
    demo set when there are no real images): ``(tables folder, images folder)``. ``copies`` > 1: every row and
    image that many times under ids of their own (``<k>-<ImageID>``, the files linked where the disk allows), a
    dataset of the full set's size from the images beside the repo."""
    from mlc.data.table import read_table, submission_csv
    if not (real / "images").is_dir():
        from mlc.data.demo import make_demo_dataset
        demo = Path(make_demo_dataset())
        return demo, demo / "data"
    present = {p.name for p in (real / "images").iterdir()}
    train, test = read_table(str(real / "train.csv")), read_table(str(real / "test.csv"))
    train = train[train.ImageID.isin(present).to_numpy()]
    test_ids = [i for i in test.ImageID if i in present]
    images = real / "images" if copies == 1 else root / "images"
    ids = [f"{k}-{i}" if copies > 1 else i for k in range(copies) for i in train.ImageID]
    if copies > 1:
        images.mkdir(parents=True)
        for k in range(copies):
            for name in present:
                _link(real / "images" / name, images / f"{k}-{name}")
        test_ids = [f"{k}-{i}" for k in range(copies) for i in test_ids]
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text(submission_csv(ids, list(train.Labels) * copies))
    (root / "test.csv").write_text("ImageID\n" + "".join(f"{i}\n" for i in test_ids))
    return root, images


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or none that links
        shutil.copyfile(src, dst)


def report(out: dict, latency_ms: float) -> str:
    """``jobs/bench.py --pack``'s figures as the lines it prints."""
    per, packed = out[("one object per image", False)], out[("packed", False)]
    slow_per, slow_packed = out[("one object per image", True)], out[("packed", True)]
    lines = [f"\nfirst epoch (every labelled image read, decoded and stored), {per['images']} images:",
             f"| source | requests | requests / image | img/s, proxy +0 ms | img/s, proxy +{latency_ms:g} ms |",
             "|---|---|---|---|---|"]
    for name, a, b in (("one object per image", per, slow_per), ("packed", packed, slow_packed)):
        lines.append(f"| {name} | {a['requests']} | {a['requests'] / a['images']:.4f} | {a['img_s']:.0f} | "
                     f"{b['img_s']:.0f} |")
    lines.append(f"ratios: {per['requests'] / max(1, packed['requests']):.0f}x fewer requests; "
                 f"{slow_packed['img_s'] / slow_per['img_s']:.1f}x the images/s at +{latency_ms:g} ms")
    for form, r in out["store"].items():
        lines.append(f"store {form}: {r['laid_out'] / 1024:.1f} KB an image laid out, "
                     f"{r['allocated'] / 1024:.1f} KB allocated")
    lines.append(f"compact / raw, allocated: "
                 f"{out['store']['compact']['allocated'] / out['store']['raw']['allocated']:.3f}")
    lines.append(f"original JPEGs: {out['original_bytes'] / 1024:.1f} KB an image")
    for q in out["quality"]:
        lines.append(f"slot JPEG quality {q['quality']}: {q['bytes'] / 1024:.1f} KB, {q['error']:.2f} grey levels "
                     f"mean absolute error, {q['decode_img_s']:.0f} images/s a core")
    lines += [f"decode, one core: {name}: {rate:.0f} images/s" for name, rate in out["decode"].items()]
    m = out["manifest"]
    lines.append(f"opening a pack of {m['rows']} rows ({m['shards']} shards, manifest "
                 f"{m['manifest_bytes'] / 1024:.0f} KB): {m['seconds']:.2f} s (made in {m['made_s']:.0f} s)")
    return "\n".join(lines)
