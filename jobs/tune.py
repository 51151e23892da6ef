"""Sweep learning rate, unfrozen depth and (--inputs a,b) what the network reads with Ray Tune (ASHA early stopping); each trial is a Ray Train run.

The threshold (percentile, global, per-class) is chosen per epoch on each trial's validation scores,
without retraining. At the end, under --output/--name/: results.csv, best_config.json,
plots/sweep.png, best/ (the best trial's best checkpoint), and predictions.csv + probabilities.csv
from best/ by distributed batch inference. Rerunning the same command resumes an interrupted sweep.

Examples:
  python jobs/tune.py --num-samples 3 --max-epochs 2 --output /tmp/mlc-sweeps      # embedded demo data
  RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      python jobs/tune.py --data gs://BUCKET/comp5329 --images images --weights imagenet \\
      --output gs://BUCKET/sweeps --name r50-sweep --num-samples 16 --max-epochs 8 --workers-per-trial 1
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

from mlc.cli import (add_config_arg, add_log_args, add_sweep_args, add_train_args, config_from_args,  # noqa: E402
                     run_job, sweep_from_args)

# Swept, or set by the sweep, so not flags here: the search space replaces them (--inputs is the sweep's,
# a comma-separated list of choices).
NOT_FLAGS = ("lr", "unfrozen_depth", "epochs", "inputs", "loss", "asl_gamma_neg", "pos_weight")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(p)
    add_sweep_args(p)
    add_train_args(p, skip=NOT_FLAGS)
    p.add_argument("--predict-workers", type=int, default=None,
                   help="Ray Data workers for the final batch inference (default: --workers-per-trial)")
    add_log_args(p)
    return p


def configs(args: argparse.Namespace):
    """(the trials' base TrainConfig, the SweepConfig). --inputs, --loss, --asl-gamma-neg and --pos-weight here are
    the sweep's lists of choices (SweepConfig's), not the training config's one value."""
    sweeps = {"inputs", "loss", "asl_gamma_neg", "pos_weight"}
    base = config_from_args(argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in sweeps}))
    return base, sweep_from_args(args, demo=base.data is None)


def main(args: argparse.Namespace) -> dict:
    from mlc.logs import say
    from mlc.distributed.tune import run_sweep
    base, sweep = configs(args)
    return run_sweep(base, sweep, fresh=args.fresh, progress=not args.quiet, predict_workers=args.predict_workers,
                     log=say)


if __name__ == "__main__":
    run_job(main, get_args_parser())
