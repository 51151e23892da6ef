"""Check a dataset before training: table rows, the label vocabulary with counts, labels per image, and
missing or unreadable images (image headers are read concurrently). Exits 1 listing the problems."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mlc.data.check import check_dataset, format_report  # noqa: E402
from mlc.cli import add_log_args, run_job  # noqa: E402
from mlc.data.run_data import DataPaths  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=None, help="dataset root URL (default: the embedded demo dataset)")
    p.add_argument("--images", default=None, help="image folder, relative to --data unless absolute (default: data)")
    p.add_argument("--train-csv", default=None, help="default: <data>/train.csv")
    p.add_argument("--test-csv", default=None, help="default: <data>/test.csv")
    p.add_argument("--require-labels", action="store_true",
                   help="report a training row with an empty Labels field as a problem, as jobs/train.py "
                        "--require-labels refuses it (default: such rows are images with none of the labels)")
    p.add_argument("--json", action="store_true", help="also print the report as one JSON object on the last line")
    add_log_args(p)
    return p


def main(args: argparse.Namespace) -> int:
    from mlc.cli import data_or_demo
    data = data_or_demo(args.data)
    report = check_dataset(DataPaths.resolve(data, args.images, args.train_csv, args.test_csv),
                           progress=not args.quiet, require_labels=args.require_labels)
    print(format_report(report))
    if args.json:
        print(json.dumps(report))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    run_job(main, get_args_parser())
