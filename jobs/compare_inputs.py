"""Compare what the network reads (--inputs) on one dataset, on one seeded validation split: a linear caption
baseline (TF-IDF + logistic regression, scikit-learn from the dev extra) as a reference, caption only on every
labelled row, then on the rows whose image is present the baseline again and image, caption and image+caption,
each a real training run with --weights none. Prints the README's table (Markdown) and writes
OUTPUT/compare.csv plus every run's folder.

Example (the real tables and the 2,511 real images beside the repo; about 20 minutes on a 2-core CPU):
  python jobs/compare_inputs.py --data ../shared/data/comp5329 --images images --output /tmp/mlc-compare
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mlc.cli import add_log_args, run_job  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset root holding train.csv and test.csv (path or URL)")
    p.add_argument("--images", default=None, help="image folder, inside --data when relative (default: <data>/data)")
    p.add_argument("--output", default="runs/compare", help="where the runs and compare.csv go (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation fraction (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the runs (default: %(default)s)")
    p.add_argument("--caption-epochs", type=int, default=10, help="epochs of caption-only runs (default: %(default)s)")
    p.add_argument("--image-epochs", type=int, default=8,
                   help="epochs of the runs that read images, trained from scratch (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=64,
                   help="image size of those runs; small, as from-scratch ResNet50 on a CPU (default: %(default)s)")
    p.add_argument("--model", default="resnet50",
                   help="image backbone of those runs: resnet50 (torchvision's) or a timm model name, as jobs/train.py "
                        "--model takes (default: %(default)s)")
    add_log_args(p)
    return p


def main(args: argparse.Namespace):
    from mlc.bench.inputs import compare, markdown
    from mlc.logs import say
    table = compare(args.data, args.output, images=args.images, val_fraction=args.val_fraction, seed=args.seed,
                    caption_epochs=args.caption_epochs, image_epochs=args.image_epochs, image_size=args.image_size,
                    model=args.model, log=say)
    print(markdown(table))
    return table


if __name__ == "__main__":
    run_job(main, get_args_parser())
