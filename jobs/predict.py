"""Write predictions.csv (Kaggle format) and probabilities.csv from a checkpoint alone: the label
vocabulary, image size and threshold come from it.

--checkpoint takes a run's output folder (its best/ is used), a best/ folder, or a checkpoint/ folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run output, best/ or checkpoint/ folder (path or URL)")
    p.add_argument("--data", default=None, help="dataset root (default: the one the checkpoint was trained on)")
    p.add_argument("--output", required=True, help="folder for predictions.csv and probabilities.csv")
    p.add_argument("--ids", default=None, help="any CSV with an ImageID column to predict (default: <data>/test.csv)")
    p.add_argument("--images", default=None, help="image folder (default: <data>/data)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(args: argparse.Namespace) -> dict:
    from mlc.predict import predict_from_checkpoint
    return predict_from_checkpoint(args.checkpoint, args.data, args.output, ids_csv=args.ids, images=args.images,
                                   batch_size=args.batch_size, num_workers=args.num_workers,
                                   progress=not args.quiet)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
