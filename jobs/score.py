"""Score a Kaggle-format submission (ImageID,Labels; labels space-separated; any row order) against a
labelled table in the train.csv format (ImageID,Labels,Caption). Exit code 2 when it cannot be scored."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mlc.cli import add_log_args, run_job  # noqa: E402
from mlc.eval.scoring import SubmissionError, format_report, json_summary, score_submission  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--predictions", required=True, help="the submission CSV (path or URL)")
    p.add_argument("--truth", required=True, help="the labelled CSV (path or URL)")
    p.add_argument("--json", action="store_true", help="also print one JSON object as the last line (default: off)")
    add_log_args(p)
    return p


def main(args: argparse.Namespace) -> int:
    try:
        result = score_submission(args.predictions, args.truth)
    except (SubmissionError, FileNotFoundError) as e:
        # Its own rule, older than mlc.errors: anything that cannot be scored is 2, the file missing included.
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        print(json.dumps(json_summary(result)))
    return 0


if __name__ == "__main__":
    run_job(main, get_args_parser())
