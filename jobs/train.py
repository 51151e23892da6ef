"""Train the multi-label ResNet50 with Ray Train (DDP over 1..N nodes), or in this process with --local.

Distributed (the default) joins the cluster in RAY_ADDRESS (as under `ray job submit`) or starts a
local Ray; outputs go under --output/--name/, and rerunning the same command resumes from the
latest checkpoint there. --local trains in this process on the first GPU or the CPU and writes
under --output itself.

Examples:
  python jobs/train.py --local                                   # embedded demo data, this process
  python jobs/train.py --num-workers 2 --output /tmp/mlc-runs    # demo data, 2 Ray workers
  RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      python jobs/train.py --data gs://BUCKET/comp5329 --images images --weights imagenet \\
      --output gs://BUCKET/runs --name r50-depth1 --num-workers 2-4 --batch-size 64

On an autoscaling cluster with no worker node yet, the job plans from the autoscaler's node types, asks
for the nodes and prints "waiting for N nodes of type T" until they are up (--wait-timeout); a request
no node type can hold fails at once. --num-workers MIN-MAX is elastic: it starts with what fits, grows
as nodes arrive, and continues on fewer after a Spot node is lost. --batch-size is global.
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

from mlc.cli import (BoolFlag, add_config_arg, add_log_args, add_scale_args, add_train_args,  # noqa: E402
                     config_from_args, given_or_file, run_job, scale_from_args)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local", action=BoolFlag, default=argparse.SUPPRESS,
                   help="train in this process on the first GPU, else the CPU, without Ray; --no-local: on Ray "
                        "Train (default: off, or what --config says)")
    add_config_arg(p)
    add_scale_args(p)
    add_train_args(p)
    add_log_args(p)
    return p


def main(args: argparse.Namespace) -> dict:
    from mlc.logs import say
    cfg = config_from_args(args)
    if given_or_file(args, "local", False):
        import mlc
        return mlc.fit(cfg, fresh=args.fresh, progress=not args.quiet, log=say)
    from mlc.distributed.train import fit_distributed
    return fit_distributed(cfg, scale_from_args(args), fresh=args.fresh, progress=not args.quiet, log=say)


if __name__ == "__main__":
    run_job(main, get_args_parser())
