"""Compare training recipes over seeds: losses (bce, asl, bce + --pos-weight auto) with and without EMA on the
captions of every labelled row; bce against asl for image and image+caption networks trained from scratch on the
rows whose image is present; ResNet50 beside timm backbones on those rows. Each variant runs once per seed as a
real training run; the table (Markdown) gives the mean and standard error over seeds and each variant's paired
differences in samples and macro F1 from its group's first row that reads the same inputs. Rerunning the same
command resumes: finished runs are read back from OUTPUT/results.jsonl. A rerun on that OUTPUT with other data,
validation fraction, epochs or image size exits 8 (its settings are in OUTPUT/settings.json).

Example (the real tables and the 2,511 real images beside the repo; about 2 hours on a 2-core CPU):
  python jobs/compare_recipes.py --data ../shared/data/comp5329 --images images --output /tmp/mlc-recipes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mlc.cli import add_log_args, int_list, name_list, run_job  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    from mlc.bench.recipes import DEFAULT_BACKBONES, GROUPS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset root holding train.csv and test.csv (path or URL)")
    p.add_argument("--images", default=None, help="image folder, inside --data when relative (default: <data>/data)")
    p.add_argument("--output", default="runs/recipes", help="where the runs and results.jsonl go (default: %(default)s)")
    p.add_argument("--groups", type=name_list, default=GROUPS,
                   help=f"which groups, comma-separated, of {', '.join(GROUPS)} (default: all)")
    p.add_argument("--seeds", type=int_list, default=(0, 1, 2),
                   help="seeds, comma-separated; each seeds the split and the run (default: 0,1,2)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation fraction (default: %(default)s)")
    p.add_argument("--ema", type=float, default=0.999, help="the EMA decay of the captions' EMA rows (default: %(default)s)")
    p.add_argument("--backbones", type=name_list, default=DEFAULT_BACKBONES,
                   help="timm models beside ResNet50, comma-separated (default: %(default)s)")
    p.add_argument("--caption-epochs", type=int, default=10, help="epochs of caption-only runs (default: %(default)s)")
    p.add_argument("--image-epochs", type=int, default=8,
                   help="epochs of the runs that read images, trained from scratch (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=64,
                   help="image size of those runs; small, as from-scratch training on a CPU (default: %(default)s)")
    add_log_args(p)
    return p


def main(args: argparse.Namespace):
    from mlc.bench.recipes import GROUPS, markdown, run_all, summarize
    from mlc.errors import UsageError
    from mlc.logs import say
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        raise UsageError(f"--groups: unknown group {unknown[0]!r}; choose from {', '.join(GROUPS)}")
    results = run_all(args.data, args.output, images=args.images, groups=args.groups, seeds=args.seeds,
                      val_fraction=args.val_fraction, caption_epochs=args.caption_epochs,
                      image_epochs=args.image_epochs, image_size=args.image_size, ema=args.ema,
                      backbones=args.backbones, log=say)
    print(markdown(summarize(results, args.groups, ema=args.ema, backbones=args.backbones)))
    return 0


if __name__ == "__main__":
    run_job(main, get_args_parser())
