"""Pack a dataset once into Parquet shards for training past one node's memory: each image fitted to the
decode-once store's slot (the same pixels training would decode), encoded as JPEG (or kept as raw pixels) and
written with its ImageID, labels and caption in shards of about --shard-mb, beside a manifest.json written last.

The pack is then a --data like any other (jobs/train.py, tune.py, predict.py, check_data.py, compare_inputs.py):
a run reads it a whole shard (or a row group) per request instead of one request per image.

Runs on Ray Data: on the cluster in RAY_ADDRESS across every node's CPUs, or on a local Ray. A killed pack run
again with the same flags keeps the shards already written; an output holding another dataset's pack is refused
(exit 4). Unreadable images are packed as rows without an image and named in the manifest.

examples:
  python jobs/pack.py --data ../shared/data/comp5329 --images images --output /tmp/comp5329-pack
  RAY_ADDRESS=ray://head:10001 python jobs/pack.py --data gs://b/comp5329 --images images --output gs://b/packs/comp5329
  python jobs/train.py --local --data /tmp/comp5329-pack
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("RAY_AUTH_MODE", "token")  # as jobs/train.py: Ray 2.60 clusters use token auth

from mlc.cli import add_log_args, run_job  # noqa: E402
from mlc.data.pack import QUALITY, SHARD_BYTES  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="dataset root URL, as jobs/train.py takes it (default: the demo "
                   "dataset)")
    p.add_argument("--images", default=None, help="image folder, relative to --data unless absolute or a URL "
                   "(default: <data>/data)")
    p.add_argument("--train-csv", default=None, help="default: <data>/train.csv")
    p.add_argument("--test-csv", default=None, help="default: <data>/test.csv")
    p.add_argument("--output", required=True, help="folder or URL for the pack (empty, or an unfinished pack of "
                   "the same source to resume)")
    p.add_argument("--format", choices=["jpeg", "raw"], default="jpeg",
                   help="jpeg: an image the slot holds unchanged as its own JPEG file, a shrunk one encoded at "
                        "--quality (about 1/20 of raw pixels); raw: the pixels as the store holds them, bit for bit "
                        "(default: jpeg)")
    p.add_argument("--image-size", type=int, default=224,
                   help="the --image-size the pack is for: images are fitted to its store slot (320 px at 224); "
                        "a run at this size or smaller reads it (default: 224)")
    p.add_argument("--quality", type=int, default=QUALITY,
                   help=f"JPEG quality of shrunk images' slots (default: {QUALITY}, chosen by measurement: "
                        "docs/measurements-pack.md)")
    p.add_argument("--shard-mb", type=float, default=SHARD_BYTES / 2**20,
                   help=f"target shard size in MiB (default: {SHARD_BYTES // 2**20})")
    p.add_argument("--max-image-pixels", type=int, default=50_000_000,
                   help="refuse images with more pixels than this (decompression bombs), as training does")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="Ray CPUs per shard task (default: 1)")
    add_log_args(p)
    return p


def main(args: argparse.Namespace) -> int:
    from mlc.distributed.pack import PackConfig, pack
    from mlc.cli import data_or_demo
    data = data_or_demo(args.data)
    cfg = PackConfig(data=data, output=args.output, images=args.images, train_csv=args.train_csv,
                     test_csv=args.test_csv, format=args.format, image_size=args.image_size, quality=args.quality,
                     shard_mb=args.shard_mb, max_image_pixels=args.max_image_pixels, cpus_per_task=args.cpus_per_task)
    pack(cfg, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    run_job(main, get_args_parser())
