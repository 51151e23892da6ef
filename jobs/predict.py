"""Write predictions.csv (Kaggle format) and probabilities.csv from a checkpoint alone: the label
vocabulary, image size and threshold come from it.

--checkpoint takes a run's output folder (its best/ is used), a best/ folder, or a checkpoint/ folder.

With --num-workers N (N >= 1) the images are scored by N Ray Data actors spread over the Ray cluster
named by RAY_ADDRESS (a local Ray is started when it is unset), each on a GPU when the cluster has
GPUs; the files are written by this process, in input order. With --local (the default when
--num-workers is not given) it all runs in this process, on its first GPU if there is one.

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

from mlc.cli import BoolFlag, add_config_arg, add_log_args, from_file, run_job  # noqa: E402
from mlc.config import TrainConfig, choices_of  # noqa: E402
from mlc.errors import UsageError  # noqa: E402

# Every setting's default; each flag's default is SUPPRESS, so a flag absent from the parsed namespace was not
# given and a --config file (a predict_config.json) may set it.
DEFAULTS = {"checkpoint": None, "data": None, "output": None, "ids": None, "images": None, "batch_size": 64,
            "num_workers": None, "gpus_per_worker": None, "cpus_per_worker": None, "loader_workers": None,
            "local": None, "tta": None}
S = argparse.SUPPRESS


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=S, help="run output, best/ or checkpoint/ folder (path or URL); required "
                   "unless --config names it")
    p.add_argument("--data", default=S, help="dataset root (default: the one the checkpoint was trained on)")
    p.add_argument("--output", default=S, help="folder for predictions.csv, probabilities.csv and "
                   "predict_config.json; required unless --config names it")
    p.add_argument("--ids", default=S, help="any CSV with an ImageID column to predict (default: <data>/test.csv)")
    p.add_argument("--local", action=BoolFlag, default=S,
                   help="score in this process, on its first GPU or the CPU, as jobs/train.py --local trains; "
                        "--no-local: on Ray (default: in this process unless --num-workers is given)")
    p.add_argument("--images", default=S,
                   help="image folder, relative to --data unless absolute or a URL (default: the folder the "
                        "checkpoint was trained with, else <data>/data)")
    p.add_argument("--batch-size", type=int, default=S,
                   help="per worker: images per forward pass of each Ray worker (or of this process with "
                        "--local); unlike training's global --batch-size, prediction has no optimizer "
                        "step to keep constant, so it is not divided among workers (default: 64)")
    p.add_argument("--num-workers", type=int, default=S,
                   help="Ray workers, as in jobs/train.py: here Ray Data actors that each load the model and score "
                        "their share across the cluster in RAY_ADDRESS, or a local Ray; giving it means --no-local "
                        "(default: 1 with --no-local; 0 scores in this process, as --local)")
    p.add_argument("--gpus-per-worker", type=float, default=S,
                   help="GPUs per Ray worker; fractions share a GPU between scoring actors, which training "
                        "(whole GPUs only) cannot (default: 1 if the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-worker", type=float, default=S,
                   help="CPUs per Ray worker, also its torch threads (default: 1)")
    p.add_argument("--loader-workers", type=int, default=S,
                   help="DataLoader worker processes with --local, as in jobs/train.py (default: auto, chosen in "
                        "the process that scores from the CPUs it may use)")
    p.add_argument("--tta", choices=choices_of(TrainConfig, "tta"), default=S,
                   help="test-time augmentation: none, or flip: each image's probabilities averaged with its "
                        "mirror's, on every worker (default: the model's own --tta, as it was validated)")
    add_config_arg(p)
    add_log_args(p)
    return p


def settings(args: argparse.Namespace) -> dict:
    """Flags given, over the --config file's ``predict`` section, over DEFAULTS; ``local`` and ``num_workers``
    resolved to one meaning."""
    given = {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}
    s = {**DEFAULTS, **{k: v for k, v in from_file(args, "predict").items() if k in DEFAULTS}, **given}
    if "local" in given and "num_workers" in given and given["local"] and given["num_workers"]:
        raise UsageError("--local scores in this process; --num-workers N asks for Ray workers: give one of them")
    if "local" in given:
        local = given["local"]
    elif "num_workers" in given:
        local = given["num_workers"] == 0
    else:
        local = s["local"] if s["local"] is not None else not s["num_workers"]
    s["local"], s["num_workers"] = local, 0 if local else max(1, s["num_workers"] or 1)
    missing = [f"--{k}" for k in ("checkpoint", "output") if not s[k]]
    if missing:
        raise UsageError(f"{' and '.join(missing)} required (on the command line or in the --config file)")
    return s


def main(args: argparse.Namespace) -> dict:
    import mlc
    from mlc.logs import say
    s = settings(args)
    return mlc.predict(s["checkpoint"], s["data"], s["output"], ids_csv=s["ids"], images=s["images"],
                       batch_size=s["batch_size"], num_workers=s["num_workers"], loader_workers=s["loader_workers"],
                       gpus_per_worker=s["gpus_per_worker"], cpus_per_worker=s["cpus_per_worker"],
                       tta=s["tta"], progress=not args.quiet, log=say)


if __name__ == "__main__":
    run_job(main, get_args_parser())
