"""Rebuild report.html from a finished run: a local or Ray run's folder, a sweep's folder (its best trial and its
prediction) or a prediction's --output. Training and jobs/predict.py write one themselves; this is for runs made
before they did, or with other limits.

The report holds the run's identity and settings, the best epoch's metrics, the per-class table, the plots, the
worst validation errors with thumbnails, the label co-occurrence and a sample of the test predictions, in one file
that opens from disk (no server, no network). Thumbnails are decoded again from the image folder by mlc's image
loader (through its byte cache for remote images).

examples:
  python jobs/report.py --run runs/r1                       # writes runs/r1/report.html
  python jobs/report.py --run gs://b/sweeps/s1 --output s1-report.html --max-mb 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mlc.cli import add_log_args, run_job  # noqa: E402
from mlc.errors import DataError, UsageError  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    from mlc.report import limits as build
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the run, sweep or prediction folder (path or URL)")
    p.add_argument("--output", default=None, help="where to write the report (default: <run>/report.html)")
    p.add_argument("--max-mb", type=float, default=build.MAX_BYTES / 1e6,
                   help="size limit in MB; the galleries hold as many thumbnails as fit "
                        f"(default: {build.MAX_BYTES / 1e6:g})")
    p.add_argument("--errors", type=int, default=build.MAX_ERRORS,
                   help=f"at most this many validation errors, worst first (default: {build.MAX_ERRORS})")
    p.add_argument("--test-sample", type=int, default=build.MAX_TEST,
                   help=f"at most this many test predictions, spread over the table (default: {build.MAX_TEST})")
    add_log_args(p)
    return p


def main(args: argparse.Namespace) -> dict:
    from mlc.io import storage
    from mlc.io.lock import hold
    from mlc.logs import say
    from mlc.report.build import write_report
    if args.max_mb <= 0 or args.errors < 0 or args.test_sample < 0:
        raise UsageError("--max-mb must be > 0, --errors and --test-sample >= 0")
    run = args.run.rstrip("/")
    if not storage.isdir(run):
        raise DataError(f"{storage.safe_url(run)} is not a folder; --run takes a run, sweep or prediction folder")
    if not any(storage.exists(storage.join(run, *p)) for p in (("best", "meta.json"), ("predict_config.json",))):
        raise DataError(f"{storage.safe_url(run)} holds no finished run or prediction (no best/meta.json, no "
                        "predict_config.json); a run writes best/ after its first epoch")
    output = args.output or storage.join(run, "report.html")
    kwargs = dict(output=output, max_bytes=int(args.max_mb * 1e6), max_errors=args.errors, max_test=args.test_sample,
                  log=say)
    if args.output is None:  # writing into the run's folder: not while a run or a prediction writes there
        with hold(run, what="a report", log=say):
            return write_report(run, **kwargs)
    return write_report(run, **kwargs)


if __name__ == "__main__":
    run_job(main, get_args_parser())
