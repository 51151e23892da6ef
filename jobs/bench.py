"""Benchmark: img/s of the training step and of prediction for unfrozen depths and precisions, measured side
by side in one run (machines are noisy: compare rows of one run, not numbers across runs).

With --e2e: end-to-end training and prediction img/s of the 2020 report's pipeline, of mlc's own (default
flags) and of the model alone, on the same real JPEGs (../shared/data/comp5329/images when present, else
the demo images), interleaved in one run; ratios and peak memory.

With --gpu: the prepared GPU check (under 5 minutes on one GPU): full fine-tune and depth-1 training img/s
(bf16, channels_last, compiled and not), prediction img/s, and end-to-end with real JPEGs decoded on the
CPU against decoded on the GPU.

With --ray-predict: Ray Data prediction with decoding inside the model actors against decoding in CPU
tasks ahead of them (the layout GPU actors get), on this machine's CPUs.

With --spot: what Spot-native training costs: one poll for notices in a Ray Train group of 2 CPU workers, and
one checkpoint of the training state (depths 1 and 4) written to local disk.

With --serve: requests/s and p50/p99 latency of jobs/serve.py's app on a local Ray, batching requests against
scoring each alone, the same concurrent clients on both in alternating passes.

With --io: loader img/s (decode + augment, no model) over the same images read from local disk, from a
GCS API server (gcp-storage-emulator, from the dev extra) directly, and through a proxy that adds
--latency-ms to every request, with a cold and a warm byte cache; ratios to local disk."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mlc.cli import int_list  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=None,
                   help="input size in pixels (default: 224; with --pack-f1 the demo's 64)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default: %(default)s)")
    p.add_argument("--depths", default="1,4", help="unfrozen depths to compare (default: %(default)s)")
    p.add_argument("--amp", default="off,bf16", help="precisions to compare: off, auto, bf16 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="also print the rows as one JSON list on the last line")
    e2e = p.add_argument_group("end to end (--e2e)")
    e2e.add_argument("--e2e", action="store_true", help="compare the 2020 pipeline, mlc's and the model alone")
    e2e.add_argument("--e2e-images", type=int, default=224,
                     help="images per pass; the first batch of each pass is not timed (default: %(default)s)")
    e2e.add_argument("--repeats-e2e", type=int, default=2, help="interleaved passes per row, best kept "
                     "(default: %(default)s)")
    p.add_argument("--gpu", action="store_true", help="the prepared GPU check (needs a CUDA device)")
    rp = p.add_argument_group("Ray Data prediction (--ray-predict)")
    rp.add_argument("--ray-predict", action="store_true",
                    help="distributed prediction on a local Ray: decoding inside the model actors against decoding "
                         "in CPU tasks ahead of them (the GPU layout), on the CPU")
    rp.add_argument("--ray-images", type=int, default=400, help="images to score (default: %(default)s)")
    rp.add_argument("--ray-actors", type=int, default=1, help="model actors (default: %(default)s)")
    sp = p.add_argument_group("Spot (--spot)")
    sp.add_argument("--spot", action="store_true", help="the cost of a poll for notices (Ray, 2 workers) and of a "
                    "checkpoint (depths 1 and 4)")
    sv = p.add_argument_group("serving (--serve)")
    sv.add_argument("--serve", action="store_true", help="Ray Serve: batched requests against one per forward pass")
    sv.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients (default: %(default)s)")
    sv.add_argument("--requests", type=int, default=8, help="requests per client per pass (default: %(default)s)")
    sv.add_argument("--passes", type=int, default=3, help="alternating passes per app, median kept (default: %(default)s)")
    pk = p.add_argument_group("packed datasets (--pack)")
    pk.add_argument("--pack", action="store_true", help="a pack against one object per image: storage requests and "
                    "images/s of a first epoch through the GCS proxy (+--latency-ms), store bytes, decode rates, "
                    "pack throughput, and the time to open a pack of --pack-rows synthetic images")
    pk.add_argument("--pack-rows", type=int, default=200_000, help="rows of the synthetic pack (default: %(default)s)")
    pk.add_argument("--pack-copies", type=int, default=1, help="each real image and row this many times, under ids "
                    "of their own (15: about the full 30,000-row set; default: %(default)s)")
    pk.add_argument("--pack-f1", type=int_list, default=None, metavar="SEEDS",
                    help="instead: validation F1 of the demo's run from its source through a raw store against its "
                         "pack through a compact store, paired by seed (comma-separated seeds, e.g. 0,1,2; "
                         "at the demo's 64 px by default; --image-size 32 shrinks and re-encodes them into 48 px slots)")
    io = p.add_argument_group("loader I/O (--io)")
    io.add_argument("--io", action="store_true", help="measure loader I/O instead of model compute")
    io.add_argument("--images", default=None,
                    help="folder of images to read (default: ../shared/data/comp5329/images beside the repo, "
                         "else the demo dataset's images)")
    io.add_argument("--io-images", type=int, default=2000, help="images per pass (default: %(default)s)")
    io.add_argument("--io-batch-size", type=int, default=32, help="loader batch size (default: %(default)s)")
    io.add_argument("--loader-workers", type=int, default=2, help="DataLoader worker processes (default: %(default)s)")
    io.add_argument("--latency-ms", type=float, default=50.0, help="delay the proxy adds to every request "
                    "(default: %(default)s)")
    io.add_argument("--sequential-images", type=int, default=200,
                    help="images for the one-GET-at-a-time row (default: %(default)s)")
    io.add_argument("--repeats", type=int, default=2, help="passes per row, best kept (default: %(default)s)")
    return p


def main_io(args: argparse.Namespace) -> list:
    import json as _json
    import os
    import tempfile

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "tests"))
    try:
        from gcs_server import GCS_ENV, Emulator, RemoteProxy
    except ImportError as e:
        raise SystemExit(f"--io needs the dev extra (pip install -e '.[dev]') and the repo's tests/: {e}")
    os.environ.update(GCS_ENV)  # before gcsfs is imported
    import torch

    from mlc.io import storage
    from mlc.bench.model import measure_io

    folder = Path(args.images) if args.images else repo.parent / "shared" / "data" / "comp5329" / "images"
    if not folder.is_dir():
        from mlc.data.demo import make_demo_dataset
        folder = Path(make_demo_dataset()) / "data"
    names = sorted(p.name for p in folder.iterdir() if p.is_file())[: args.io_images]
    if not names:
        raise SystemExit(f"no images in {folder}")
    size_mb = sum((folder / n).stat().st_size for n in names) / 2**20
    print(f"loader I/O: {len(names)} images ({size_mb:.1f} MB) from {folder}; {args.image_size} px train transform, "
          f"batch {args.io_batch_size}, {args.loader_workers} loader workers, torch {torch.get_num_threads()} "
          f"threads, {os.cpu_count()} CPUs", flush=True)

    emulator = Emulator()
    proxies = []
    try:
        def proxy(latency):  # in its own process, as the network would be: not sharing this one's GIL
            proxies.append(RemoteProxy(emulator.endpoint, latency_ms=latency))
            return proxies[-1].endpoint

        fast, slow = proxy(0), proxy(args.latency_ms)
        emulator.create_bucket("mlc-bench")
        os.environ["STORAGE_EMULATOR_HOST"] = fast
        remote = [f"gs://mlc-bench/images/{n}" for n in names]
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: storage.write_bytes(f"gs://mlc-bench/images/{n}", (folder / n).read_bytes()),
                          names))
        with tempfile.TemporaryDirectory(prefix="mlc-bench-cache-") as cache_root:
            rows = measure_io([str(folder / n) for n in names], remote,
                              endpoints={"direct": emulator.endpoint, "proxy": fast, "latency": slow,
                                         "latency_ms": args.latency_ms},
                              cache_root=cache_root, image_size=args.image_size, batch_size=args.io_batch_size,
                              workers=args.loader_workers, sequential_images=min(args.sequential_images, len(names)),
                              repeats=args.repeats,
                              server_pids=[emulator.proc.pid] + [p.proc.pid for p in proxies])
    finally:
        for p in proxies:
            p.stop()
        emulator.stop()

    base = rows[0]["img_s"]
    print(f"\nbest of {args.repeats} interleaved passes per row; CPU seconds per 1000 images, in the loader "
          "(this process and its workers) and in the emulator + proxy processes, which share the same cores:\n")
    print("| source | img/s | vs local disk | loader CPU s / 1000 img | emulator + proxy CPU s / 1000 img |\n"
          "|---|---|---|---|---|")
    for r in rows:
        server = "" if r["server_cpu_s"] is None else f"{1000 * r['server_cpu_s'] / r['images']:.1f}"
        print(f"| {r['name']} | {r['img_s']:.1f} | {r['img_s'] / base:.2f}x | "
              f"{1000 * r['loader_cpu_s'] / r['images']:.1f} | {server} |")
    if args.json:
        print(_json.dumps(rows))
    return rows


def main_pack(args: argparse.Namespace) -> dict:
    import tempfile
    import time

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "tests"))
    from gcs_server import GCS_ENV, Emulator, RemoteProxy
    os.environ.update(GCS_ENV)  # before gcsfs is imported
    import torch

    from mlc.bench import pack as bench
    from mlc.data.pack_write import PackConfig, pack_in_process
    from pack_helpers import synthetic_pack
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="mlc-bench-pack-") as tmp:
        tables, images = bench.present_images_source(repo.parent / "shared" / "data" / "comp5329", Path(tmp) / "tables",
                                                   args.pack_copies)
        names = sorted(p.name for p in images.iterdir())
        out["original_bytes"] = sum((images / n).stat().st_size for n in names) / len(names)
        local = str(Path(tmp) / "pack")
        start = time.perf_counter()
        manifest = pack_in_process(PackConfig(data=str(tables), images=str(images), output=local,
                                              image_size=args.image_size), log=lambda *_: None)
        rows = sum(t["rows"] for t in manifest["tables"].values())
        out["pack_img_s"] = rows / (time.perf_counter() - start)
        print(f"pack: {rows} images from {images} in one process: {out['pack_img_s']:.0f} images/s "
              f"({os.cpu_count()} CPUs, torch {torch.__version__})", flush=True)
        out["decode"] = bench.decode_rates(images, names[:400], local)
        out["quality"] = bench.quality_sweep(images, names[:200], manifest["side"])
        out["store"] = bench.store_bytes(local, args.image_size)
        emulator = Emulator()
        fast = RemoteProxy(emulator.endpoint)
        slow = RemoteProxy(emulator.endpoint, latency_ms=args.latency_ms)
        try:
            emulator.create_bucket("mlc-bench")
            os.environ["STORAGE_EMULATOR_HOST"] = fast.endpoint
            from mlc.io import storage
            for f in Path(tables).glob("*.csv"):
                storage.write_bytes(f"gs://mlc-bench/src/{f.name}", f.read_bytes())
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda n: storage.write_bytes(f"gs://mlc-bench/src/data/{n}", (images / n).read_bytes()),
                              names))
                list(pool.map(lambda f: storage.write_bytes(f"gs://mlc-bench/pack/{f.name}", f.read_bytes()),
                              list(Path(local).iterdir())))
            for name, data in (("one object per image", "gs://mlc-bench/src"), ("packed", "gs://mlc-bench/pack")):
                for proxy in (fast, slow):
                    os.environ["STORAGE_EMULATOR_HOST"] = proxy.endpoint
                    with tempfile.TemporaryDirectory(prefix="mlc-bench-cache-") as cache:
                        os.environ["MLC_BYTE_CACHE"] = cache
                        proxy.reset() if proxy is fast else None
                        out[(name, proxy is slow)] = bench.first_epoch(data, args.image_size, lambda: proxy.count())
        finally:
            fast.stop()
            slow.stop()
            emulator.stop()
        start = time.perf_counter()
        big = synthetic_pack(Path(tmp) / "synthetic", args.pack_rows)
        made = time.perf_counter() - start
        out["manifest"] = bench.manifest_read(big)
        out["manifest"]["made_s"] = made
    print(bench.report(out, args.latency_ms))
    if args.json:
        print(json.dumps({(" ".join(map(str, k)) if isinstance(k, tuple) else k): v for k, v in out.items()}))
    return out


def main_pack_f1(args: argparse.Namespace) -> list:
    from mlc.bench.pack import demo_f1_pairs
    rows, s = demo_f1_pairs(args.pack_f1, args.image_size)
    print(f"demo at {args.image_size} px, {s['seeds']} seeds: samples F1 raw {s['raw']:.4f}, compact "
          f"{s['compact']:.4f}; paired compact - raw {s['diff']:+.4f} (standard error {s['diff_se']:.4f})")
    return rows


def main(args: argparse.Namespace) -> list:
    import torch

    from mlc.bench.model import measure
    from mlc.model.device import pick_device
    device = pick_device()
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; image size {args.image_size}, batch {args.batch_size}, {args.steps} timed steps")
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        for amp in args.amp.split(","):
            r = measure(depth, args.image_size, args.batch_size, amp, device, steps=args.steps)
            rows.append(r)
            print(f"depth {depth}  amp {r['amp']:>14}  train {r['train_img_s']:8.1f} img/s  "
                  f"predict {r['predict_img_s']:8.1f} img/s", flush=True)
    base = rows[0]
    print("ratios to the first row (train, predict):")
    for r in rows:
        print(f"  depth {r['depth']} {r['amp']}: {r['train_img_s'] / base['train_img_s']:.2f}x, "
              f"{r['predict_img_s'] / base['predict_img_s']:.2f}x")
    if args.json:
        print(json.dumps(rows))
    return rows


def _image_folder(args) -> Path:
    repo = Path(__file__).resolve().parents[1]
    folder = Path(args.images) if args.images else repo.parent / "shared" / "data" / "comp5329" / "images"
    if not folder.is_dir():
        from mlc.data.demo import make_demo_dataset
        folder = Path(make_demo_dataset()) / "data"
    return folder


def main_ray_predict(args: argparse.Namespace) -> dict:
    import ray

    from mlc.config import TrainConfig
    from mlc.model.resnet import bare_state_dict, build_model
    from mlc.distributed.predict import score_distributed
    folder = _image_folder(args)
    ids = sorted((p.name for p in folder.iterdir() if p.is_file()), key=lambda s: (len(s), s))[: args.ray_images]
    cfg = TrainConfig(image_size=args.image_size, unfrozen_depth=1, dropout=0.0, amp="auto")
    state = bare_state_dict(build_model(18, 1, 0.0, weights="none"))
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    out = {}
    try:
        print(f"Ray Data prediction: {len(ids)} images from {folder}, {args.ray_actors} model actor(s), "
              f"{os.cpu_count()} CPUs, batch {args.batch_size}", flush=True)
        for rep in range(2):
            for split in (False, True):
                r = score_distributed(state, ids, str(folder), cfg, 18, num_workers=args.ray_actors,
                                      gpus_per_worker=0, batch_size=args.batch_size, split=split,
                                      log=lambda *_: None, progress=False)
                name = "decode in CPU tasks, model actors" if split else "decode inside the model actors"
                print(f"  [{rep + 1}/2] {name:<36} {r['img_per_s']:6.1f} img/s (actor start-up included)", flush=True)
                out[name] = max(out.get(name, 0), r["img_per_s"])
    finally:
        ray.shutdown()
    a, b = out.values()
    print(f"\nsplit / one stage: {b / a:.2f}x (best of 2 each)")
    return out


def main_serve(args: argparse.Namespace) -> dict:
    import socket
    import tempfile

    import ray

    from mlc.distributed.serve_bench import measure, write_checkpoint
    folder = _image_folder(args)
    images = [p.read_bytes() for p in sorted(folder.iterdir())[:64] if p.is_file()]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    print(f"serving: {len(images)} images from {folder}, {args.image_size} px, {args.clients} clients x "
          f"{args.requests} requests per pass, 1 replica (1 CPU) per app, {os.cpu_count()} CPUs", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="mlc-serve-bench-") as ckpt:
            write_checkpoint(ckpt, args.image_size)
            out = measure(ckpt, images, port=port, clients=args.clients, per_client=args.requests,
                          passes=args.passes, max_batch=args.batch_size)
    finally:
        ray.shutdown()
    print(f"\nmedian of {args.passes} alternating passes\n\n| app | req/s | p50 ms | p99 ms |\n|---|---|---|---|")
    for name, r in out.items():
        print(f"| {name} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    (a, ra), (b, rb) = out.items()
    print(f"\n{a} / {b}: {ra['rps'] / rb['rps']:.2f}x req/s, p50 {ra['p50_ms'] / rb['p50_ms']:.2f}x")
    return out


def main_spot(args: argparse.Namespace) -> dict:
    import tempfile

    import ray

    from mlc.distributed.spot_bench import checkpoint_cost, poll_cost
    with tempfile.TemporaryDirectory(prefix="mlc-spot-bench-") as folder:
        costs = [checkpoint_cost(f"{folder}/d{d}", d) for d in (1, 4)]
    for c in costs:
        print(f"checkpoint, depth {c['depth']}: {c['mb']:.0f} MB in {c['seconds']:.2f} s to local disk "
              f"(--checkpoint-every auto: every {max(60, 50 * c['seconds']):.0f} s)")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    try:
        poll = poll_cost(workers=2, polls=200)
    finally:
        ray.shutdown()
    print(f"poll for notices, 2 Ray workers (gloo): median {poll['median_ms']:.1f} ms, p90 {poll['p90_ms']:.1f} ms; "
          f"at one poll per 2 s of training: {poll['median_ms'] / 2000:.2%}")
    return {"checkpoints": costs, "poll": poll}


def main_e2e(args: argparse.Namespace) -> dict:
    import torch

    from mlc.bench.e2e import report, run
    folder = _image_folder(args)
    paths = sorted((str(p) for p in folder.iterdir() if p.is_file()), key=lambda s: (len(s), s))[: args.e2e_images]
    print(f"end to end: {len(paths)} images from {folder}, batch {args.batch_size}, {args.image_size} px, depth 1; "
          f"CPU, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs", flush=True)
    out = run(paths, repeats=args.repeats_e2e, batch_size=args.batch_size, image_size=args.image_size)
    rows = out["rows"]
    print(report(out, args.repeats_e2e))
    if args.json:
        print(json.dumps({f"{n} {k}": v for (n, k), v in rows.items()}))
    return out


if __name__ == "__main__":
    _args = get_args_parser().parse_args()
    _args.image_size = _args.image_size or (64 if _args.pack_f1 else 224)
    if _args.gpu:
        from mlc.bench.gpu import main as gpu_main
        gpu_main(_args, _image_folder(_args))
    elif _args.e2e:
        main_e2e(_args)
    elif _args.ray_predict:
        main_ray_predict(_args)
    elif _args.serve:
        main_serve(_args)
    elif _args.spot:
        main_spot(_args)
    elif _args.io:
        main_io(_args)
    elif _args.pack_f1:
        main_pack_f1(_args)
    elif _args.pack:
        main_pack(_args)
    else:
        main(_args)
