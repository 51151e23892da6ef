"""Train the multi-label ResNet50: locally (--local) in this process on the first GPU or the CPU.

Examples:
  python jobs/train.py --local                                   # embedded demo data
  python jobs/train.py --local --data gs://bucket/comp5329 --output gs://bucket/runs/r1 --weights imagenet
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mlc.cli import add_train_args, config_from_args  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local", action="store_true",
                   help="train in this process on the first GPU, else the CPU, without Ray")
    add_train_args(p)
    return p


def main(args: argparse.Namespace) -> dict:
    from mlc.trainer import fit
    if not args.local:
        sys.exit("error: distributed training on Ray Train is not available yet; run with --local")
    return fit(config_from_args(args), fresh=args.fresh, progress=not args.quiet)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
