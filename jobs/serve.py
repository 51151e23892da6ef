"""Serve a trained model over HTTP on Ray Serve: POST an image, get its labels and every label's score.

--checkpoint takes a run folder (its best/), a sweep folder (its best/), a best/ or epoch_NNNN/ folder, local
or gs://. On a cluster (RAY_ADDRESS set, e.g. under `ray job submit`) the app is deployed and the job ends;
Serve keeps it running (`serve shutdown` or `serve status` with the Ray CLI). Without RAY_ADDRESS a local Ray
is started and the job serves until Ctrl-C.

Routes: POST /predict (the image as the body, or a multipart form with 'image' and, for a caption model,
'caption'); GET /labels; GET /healthz. Replicas batch concurrent requests (--max-batch-size, --batch-wait-ms)
and take whole GPUs when the cluster has them (--gpus-per-replica); with --max-replicas above --min-replicas
Serve scales the replicas with the queue. With a token (--auth-token-file, or $MLC_SERVE_TOKEN) /predict and
/labels need 'Authorization: Bearer <token>'; a --host other than loopback needs one. Serve's address is the
cluster's: deploying again on another --host or --port is refused (exit 2) while Serve runs.

examples:
  python jobs/serve.py --checkpoint runs/demo                 # http://127.0.0.1:8000/predict, until Ctrl-C
  curl -s --data-binary @image.jpg http://127.0.0.1:8000/predict
  ray job submit --working-dir . -- python jobs/serve.py --checkpoint gs://b/sweeps/s1 --host 0.0.0.0 \\
      --min-replicas 1 --max-replicas 4       # the token from $MLC_SERVE_TOKEN on the head
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
# Ray 2.60 clusters use token auth; a client presents its token only in token mode, read once at import.
os.environ.setdefault("RAY_AUTH_MODE", "token")

from mlc.cli import add_log_args, run_job  # noqa: E402
from mlc.distributed.serve_http import (DEFAULT_READ_TIMEOUT_S, MIN_UPLOAD_RATE, TOKEN_ENV,  # noqa: E402
                                        check_exposure, read_token, token_digest)
from mlc.config import TrainConfig, choices_of  # noqa: E402
from mlc.errors import UsageError  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run or sweep folder, best/ or epoch_NNNN/, local or gs://")
    # Loopback by default: a service on every interface is a decision its user makes (--host 0.0.0.0).
    p.add_argument("--host", default="127.0.0.1", help="address Serve's HTTP proxy listens on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port of Serve's HTTP proxy (default: %(default)s)")
    p.add_argument("--route-prefix", default="/", help="path the app's routes sit under (default: %(default)s)")
    p.add_argument("--name", default="mlc", help="Serve application name; deploying again updates it (default: %(default)s)")
    p.add_argument("--min-replicas", type=int, default=1, help="replicas kept running (default: %(default)s)")
    p.add_argument("--max-replicas", type=int, default=None,
                   help="replicas at most; above --min-replicas Serve scales with the queue (default: --min-replicas)")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs per replica; default: 1 when the cluster's node types have GPUs, else 0")
    p.add_argument("--cpus-per-replica", type=float, default=1.0,
                   help="CPUs per replica, which decode the requests' images (default: %(default)s)")
    # 16 images of 224 px fill a GPU's forward pass well; a request waits at most 10 ms for others to join it.
    p.add_argument("--max-batch-size", type=int, default=16, help="requests scored in one forward pass, at most "
                   "(default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a request waits for others to fill "
                   "its batch (default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body accepted, MB "
                   "(default: %(default)s)")
    p.add_argument("--read-timeout-s", type=float, default=DEFAULT_READ_TIMEOUT_S,
                   help="seconds a client has to start sending its request body, which must then keep up "
                   f"{MIN_UPLOAD_RATE // 1024} KiB/s; else 408 (default: %(default)s)")
    p.add_argument("--auth-token-file", default=None,
                   help=f"file holding the token clients send as 'Authorization: Bearer <token>' on /predict and "
                   f"/labels; needed when --host is not loopback (default: ${TOKEN_ENV} if set, else no token)")
    p.add_argument("--tta", choices=choices_of(TrainConfig, "tta"), default=None,
                   help="test-time augmentation: none, or flip: each image's probabilities averaged with its mirror's "
                        "(twice the model time per request) (default: the model's own --tta, as it was validated)")
    add_log_args(p)
    return p


def check_args(args: argparse.Namespace) -> str | None:
    """Every usage check, before anything heavy is imported; returns the token (None: no token)."""
    problems = []
    max_replicas = args.max_replicas if args.max_replicas is not None else args.min_replicas
    if args.min_replicas < 1 or max_replicas < args.min_replicas:
        problems.append(f"--min-replicas/--max-replicas must satisfy 1 <= min <= max, got {args.min_replicas}, "
                        f"{max_replicas}")
    if (args.max_batch_size < 1 or args.batch_wait_ms < 0 or args.max_body_mb <= 0 or args.cpus_per_replica <= 0
            or args.read_timeout_s <= 0):
        problems.append("--max-batch-size >= 1, --batch-wait-ms >= 0, --max-body-mb > 0, --cpus-per-replica > 0 and "
                        "--read-timeout-s > 0")
    if args.gpus_per_replica is not None and args.gpus_per_replica < 0:
        problems.append(f"--gpus-per-replica must be >= 0, got {args.gpus_per_replica}")
    if problems:
        raise UsageError("; ".join(problems))
    token = read_token(args.auth_token_file, os.environ)
    check_exposure(args.host, token is not None)
    return token


def main(args: argparse.Namespace) -> int:
    token = check_args(args)
    from mlc.distributed import cluster, serve
    from mlc.distributed.cluster import ensure_ray
    from mlc.logs import say
    from mlc.prediction.checkpoints import load_predictor

    max_replicas = args.max_replicas if args.max_replicas is not None else args.min_replicas
    load_predictor(args.checkpoint)  # an unusable checkpoint fails here, not in every replica
    started_here = not os.environ.get("RAY_ADDRESS")
    ensure_ray(say)
    gpus = args.gpus_per_replica
    if gpus is None:
        c = cluster.describe()
        gpus = cluster.default_gpus(c.shapes())
    url = serve.run(args.checkpoint, host=args.host, port=args.port, route_prefix=args.route_prefix, name=args.name,
                    min_replicas=args.min_replicas, max_replicas=max_replicas, gpus=gpus,
                    cpus=args.cpus_per_replica, max_batch_size=args.max_batch_size,
                    batch_wait_s=args.batch_wait_ms / 1000, max_body=int(args.max_body_mb * 2**20),
                    read_timeout_s=args.read_timeout_s, token_sha256=token_digest(token) if token else None,
                    tta=args.tta, log=say)
    say(f"routes: {serve.describe(url)}")
    header = ' -H "Authorization: Bearer $TOKEN"' if token else ""
    say(f"try: curl -s{header} --data-binary @IMAGE.jpg {url}/predict")
    if started_here:  # this process's Ray ends with it: serve until interrupted
        import time
        say("serving until Ctrl-C (the local Ray started here ends with this process)")
        while True:
            time.sleep(3600)
    return 0


if __name__ == "__main__":
    run_job(main, get_args_parser())
