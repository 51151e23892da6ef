"""Write predictions.csv (Kaggle format) and probabilities.csv from a checkpoint alone: the label
vocabulary, image size and threshold come from it.

--checkpoint takes a run's output folder (its best/ is used), a best/ folder, or a checkpoint/ folder.

With --num-workers N (N >= 1) the images are scored by N Ray Data actors spread over the Ray cluster
named by RAY_ADDRESS (a local Ray is started when it is unset), each on a GPU when the cluster has
GPUs; the files are written by this process, in input order. With --num-workers 0 (the default) it
all runs in this process, on its first GPU if there is one.

examples:
  python jobs/predict.py --checkpoint runs/r1 --output runs/r1/again
  RAY_ADDRESS=ray://head:10001 python jobs/predict.py --checkpoint gs://b/runs/r1 --data gs://b/comp5329 \\
      --output gs://b/runs/r1/test --num-workers 8
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
# Ray 2.60 clusters use token auth (local ones by default), and a client presents its token
# (~/.ray/auth_token) only in token mode, which Ray reads once at import. An explicit
# RAY_AUTH_MODE in the environment still wins.
os.environ.setdefault("RAY_AUTH_MODE", "token")

from mlc.cli import add_log_args, run_job  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run output, best/ or checkpoint/ folder (path or URL)")
    p.add_argument("--data", default=None, help="dataset root (default: the one the checkpoint was trained on)")
    p.add_argument("--output", required=True, help="folder for predictions.csv and probabilities.csv")
    p.add_argument("--ids", default=None, help="any CSV with an ImageID column to predict (default: <data>/test.csv)")
    p.add_argument("--images", default=None,
                   help="image folder, relative to --data unless absolute or a URL (default: the folder the "
                        "checkpoint was trained with, else <data>/data)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="per worker: images per forward pass of each Ray worker (or of this process with "
                        "--num-workers 0); unlike training's global --batch-size, prediction has no optimizer "
                        "step to keep constant, so it is not divided among workers (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="Ray workers (actors) that score the images across the cluster in RAY_ADDRESS, or a local "
                        "Ray; 0 = in this process (default: %(default)s)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per Ray worker; fractions share a GPU between scoring actors, which training "
                        "(whole GPUs only) cannot (default: 1 if the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs per Ray worker, also its torch threads (default: 1)")
    p.add_argument("--loader-workers", type=int, default=2,
                   help="DataLoader worker processes with --num-workers 0 (default: %(default)s)")
    add_log_args(p)
    return p


def main(args: argparse.Namespace) -> dict:
    import mlc
    from mlc.logs import say
    return mlc.predict(args.checkpoint, args.data, args.output, ids_csv=args.ids, images=args.images,
                       batch_size=args.batch_size, num_workers=args.num_workers, loader_workers=args.loader_workers,
                       gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                       progress=not args.quiet, log=say)


if __name__ == "__main__":
    run_job(main, get_args_parser())
