"""Ray Train (the V2 API): the one module that touches Ray Train.

The driver (``fit_distributed``) checks the storage, starts a ``TorchTrainer`` whose workers run
``mlc.train.local.train_loop`` with ``RayGroup``, then copies the best checkpoint to ``<run>/best`` and
writes the same outputs as local mode. Each epoch rank 0 reports a checkpoint folder that holds
local mode's files (``state.pt``, ``model.pt``, ``labels.json``, ``meta.json``, validation
predictions), so ``jobs/predict.py --checkpoint <run>/epoch_0003`` and ``jobs/train.py --local``
accept it. Every rank calls ``ray.train.report`` each epoch (it is a barrier); only rank 0 passes a
checkpoint.

Resume is Ray Train's: a run started again with the same ``--name`` and ``--output`` finds its
checkpoint manager's snapshot in the run folder and ``ray.train.get_checkpoint()`` returns the
latest checkpoint; a worker failure restarts the worker group from it, up to ``--max-failures``.

Scale-from-zero and Spot: the driver plans from the node types the autoscaler can add
(:mod:`mlc.distributed.cluster`), waits for the first nodes with a deadline, and fails at once when no node type
can ever hold a worker. ``--num-workers MIN-MAX`` makes the group elastic: Ray Train starts with what
fits (at least MIN), grows as nodes arrive, and after a node is lost restarts from the latest
checkpoint with the workers that still fit. ``--batch-size`` is global, so the data order and the
learning-rate schedule are the same at every world size.

The driver never touches CUDA (it may run on a GPU head node, or a CPU one): the device and precision in
metrics.json are the ones rank 0 trained with, returned by the workers.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import ray
import ray.train
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from mlc.distributed import cluster
from mlc.io import storage
from mlc.io.lock import LOCK_NAME, hold
from mlc.train.checkpoint import load_training_state, save_model, save_training_state
from mlc.config import ScaleConfig, TrainConfig
from mlc.data.demo import with_demo_data
from mlc.errors import UsageError
from mlc.logs import verbosity
from mlc.train.outputs import SCALAR_KEYS, finish, write_metrics
from mlc.distributed.runs import ray_storage
from mlc.train.runs import SCORE, best_of, epoch_dir, epoch_of, latest_epoch_checkpoint, publish_best
from mlc.train.submission import write_predictions
from mlc.eval.thresholds import ThresholdChoice
from mlc.model.resnet import check_weights_found
from mlc.train.local import EpochEnd, check_resumable, prepare_data, train_loop

# Local filesystems that every node of a cluster can mount; other local paths are node-local.
SHARED_FSTYPES = {"nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "fuse.gcsfuse",
                  "fuse.juicefs", "fuse.s3fs", "fuse.mountpoint-s3", "9p", "virtiofs"}


class NodeLocalStorageError(RuntimeError):
    pass


def mount_fstype(path: str) -> str | None:
    """The filesystem type of the mount holding ``path`` (from /proc/mounts), or None if unknown."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[:3] for line in f]
    except OSError:
        return None
    path = os.path.realpath(path)
    best = None
    for _, point, fstype in mounts:
        point = point.replace("\\040", " ")
        if (path == point or path.startswith(point.rstrip("/") + "/")) and (best is None or len(point) > len(best[0])):
            best = (point, fstype)
    return best[1] if best else None


def check_shared_output(output: str, hosts: set) -> None:
    """Refuse a node-local ``--output`` when the run's processes live on more than one host."""
    if len(hosts) <= 1 or not storage.is_local(output):
        return
    fstype = mount_fstype(output)
    if fstype in SHARED_FSTYPES:
        return
    raise NodeLocalStorageError(
        f"--output {output} is on this node's own disk ({fstype or 'unknown filesystem'}), but the cluster has "
        f"{len(hosts)} nodes ({', '.join(sorted(hosts))}): checkpoints written by one node would be invisible to the "
        "others and to a restarted run. Use storage every node reaches: gs://bucket/prefix, or an NFS/GCS FUSE mount.")


class RayGroup:
    """This Ray Train worker's place in the group: rank, device, DDP, gathering, checkpoints via ray.train."""

    def __init__(self, run_url: str, cfg: TrainConfig, driver_host: str, tensorboard_url: str | None = None):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.run_url, self.cfg = run_url, cfg
        self.tensorboard_url = tensorboard_url or storage.join(run_url, "tensorboard")
        self.device = ray.train.torch.get_device()
        # The CPUs Ray reserved for this worker: mlc.train.local sizes the DataLoader from them.
        self.cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        check_shared_output(run_url, {driver_host, ray.util.get_node_ip_address()})

    def wrap(self, model):
        if self.world == 1:
            return model
        # DDP over the group Ray Train set up (gloo on CPUs, NCCL on GPUs); already on the device.
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def load_state(self) -> tuple[dict | None, str]:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None, self.run_url
        with ckpt.as_directory() as d:
            return load_training_state(d), f"checkpoint {os.path.basename(ckpt.path.rstrip('/'))} of {self.run_url}"

    def end_epoch(self, e: EpochEnd) -> None:
        metrics = {"epoch": e.epoch, **{k: e.row[k] for k in SCALAR_KEYS},
                   "train_loss": e.row["train_loss"], "val_loss": e.row["val_loss"],
                   "threshold_strategy": e.model_meta["threshold"]["strategy"],
                   "threshold_value": _scalar_threshold(e.model_meta["threshold"]), "workers": self.world}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="mlc-ckpt-") as d:
            save_training_state(d, e.state)
            save_model(d, e.state["model"], e.vocab, e.model_meta)
            write_predictions(d, e.val_ids, e.val_probs, e.val_ok, e.vocab,
                              ThresholdChoice.from_dict(e.model_meta["threshold"]), prefix="val_", truth=e.val_truth)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=epoch_dir(e.epoch))
        # Progress for whoever watches the run folder; the driver rewrites it, complete, at the end.
        write_metrics(self.run_url, e.state["history"], e.cfg, complete=False)


def _scalar_threshold(t: dict) -> float:
    """The percentile or global threshold's value; NaN for per-class thresholds (one per label)."""
    v = t.get("value")
    return float(v) if isinstance(v, (int, float)) else float("nan")


def worker_main(config: dict) -> dict:
    """The function every Ray Train worker runs (for jobs/train.py and for each Tune trial).

    Returns (rank 0's value reaches the driver as ``Result.return_value``) the device and precision the
    workers trained with, so the driver records them without probing its own hardware.
    """
    cfg = TrainConfig.from_dict(config["cfg"])
    from mlc.logs import say, setup
    # Lines through the mlc logger, not print: Ray Train patches print in its workers to log through the root
    # logger and also tees it to the redirected stdout, so a printed line reached the driver twice.
    setup(config.get("verbosity", 0), rank=ray.train.get_context().get_world_rank())
    group = RayGroup(config["run_url"], cfg, config["driver_host"], config.get("tensorboard_url"))
    out = train_loop(cfg, group, progress=config["progress"], on_step=config.get("on_step"), log=say)
    return {"device": str(out.get("device")), "precision": out.get("precision"), "workers": group.world}


def build_trainer(cfg: TrainConfig, run_url: str, *, name: str, storage_root: str, per_worker: dict,
                  num_workers, max_failures: int, keep_checkpoints: int, resize_check_s: float = 60.0,
                  driver_host: str, progress: bool = False, on_step=None, callbacks=None,
                  tensorboard_url: str | None = None) -> TorchTrainer:
    """The one place a Ray Train run is built, for ``fit_distributed`` and for every Tune trial.

    ``num_workers`` is an int (a fixed group) or ``(min, max)`` (elastic). Checkpoints: Ray Train keeps
    the ``keep_checkpoints`` best by validation F1 and, always, the latest (its checkpoint manager never
    deletes the latest), so best/ and resume both have theirs.
    """
    storage_path, fs = ray_storage(storage_root)
    elastic = not isinstance(num_workers, int)
    scaling = ScalingConfig(num_workers=tuple(num_workers) if elastic else num_workers,
                            use_gpu=bool(per_worker.get("GPU")), resources_per_worker=dict(per_worker),
                            **({"elastic_resize_monitor_interval_s": resize_check_s} if elastic else {}))
    return TorchTrainer(
        worker_main,
        train_loop_config={"cfg": cfg.to_dict(), "run_url": run_url, "progress": progress, "on_step": on_step,
                           "driver_host": driver_host, "tensorboard_url": tensorboard_url,
                           "verbosity": verbosity()},
        scaling_config=scaling,
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints, checkpoint_score_attribute=SCORE,
                                               checkpoint_score_order="max"),
            callbacks=callbacks,
        ),
    )


def plan_workers(scale_gpus, scale_cpus, needed: int, *, what: str, wait: bool, timeout_s: float,
                 log=print) -> tuple[dict, "cluster.Cluster"]:
    """Per-worker resources from the node types the cluster can provide; fails at once when ``needed``
    workers can never fit, waits (visibly, with a deadline) for the autoscaler's nodes when they can."""
    c = cluster.describe()
    per_worker = cluster.choose_resources(c, scale_gpus, scale_cpus, wait=wait)
    cluster.check_feasible(c, per_worker, needed, what=what, wait=wait)
    log(f"cluster: {len(c.alive)} node(s) up, planned from {c.source}; {cluster.capacity_now(c, per_worker)} "
        f"worker(s) of {cluster.fmt_resources(per_worker)} fit now, up to {cluster.capacity_max(c, per_worker)} "
        f"{'once the autoscaler has added its nodes' if c.types is not None else 'as far as this process can see'}")
    cluster.wait_for_workers(per_worker, needed, timeout_s=timeout_s, log=log, what=what)
    return per_worker, c


def absolute_output(output: str) -> str:
    if storage.is_local(output):
        output = os.path.abspath(output)
        if "/runtime_resources/" in output:
            raise UsageError(f"--output {output} is inside Ray's temporary copy of the working directory, which is "
                             "deleted after the job; give an absolute path or a gs:// URL")
    return output


def fit_distributed(cfg: TrainConfig, scale: ScaleConfig, *, fresh: bool = False, log=print, progress: bool = True,
                    on_step=None) -> dict:
    """Train with Ray Train on the cluster this process is connected to (or a local Ray), then write outputs.

    Outputs go under ``<cfg.output>/<scale.name>/``; a rerun with the same name resumes there.
    """
    t_start = time.perf_counter()
    from mlc.distributed.predict import ensure_ray
    ensure_ray(log)  # the cluster in RAY_ADDRESS (as under `ray job submit`), else a new local Ray
    given = cfg  # as the caller gave it: data=None (the demo set) stays None in config.json
    cfg = with_demo_data(cfg, log)
    output = absolute_output(cfg.output)
    run_url = storage.join(output, scale.name)
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    check_shared_output(run_url, hosts | {ray.util.get_node_ip_address()})
    storage.check_writable(run_url)
    # The driver is the run's one writer of the folder (a second submit of the same --name finds the lock).
    with hold(run_url, what=f"Ray Train run {scale.name}", log=log):
        return _fit_held(cfg.replace(output=run_url), given, scale, output, run_url, fresh=fresh, log=log,
                         progress=progress, on_step=on_step, t_start=t_start)


def replace_run(run_url: str, log) -> None:
    """--fresh, once every check has passed: remove the previous run (Ray's records too), not the lock."""
    old = [n for n in storage.listdir(run_url) if n != LOCK_NAME] if storage.isdir(run_url) else []
    if old:
        log(f"--fresh: replacing the previous run in {run_url} ({', '.join(old[:6])}{', ...' if len(old) > 6 else ''})")
    for name in old:
        storage.remove(storage.join(run_url, name), recursive=True)


def _fit_held(cfg: TrainConfig, given: TrainConfig, scale: ScaleConfig, output: str, run_url: str, *, fresh: bool,
              log, progress: bool, on_step, t_start: float) -> dict:
    data = prepare_data(cfg, log)  # fails here, before any worker starts, on unreadable tables
    check_weights_found(cfg.weights)
    previous = None if fresh else latest_epoch_checkpoint(run_url)
    if previous is not None:
        state = load_training_state(previous)
        # Compared as the workers compare it: --inputs auto resolved against the tables, as it was saved.
        check_resumable(state, cfg.replace(inputs=data.inputs), data.vocab, previous)
        log(f"resuming run {scale.name}: {previous} holds epoch {state['epoch']}; "
            f"training continues at epoch {state['epoch'] + 1} of {cfg.epochs}")

    per_worker, _ = plan_workers(scale.gpus_per_worker, scale.cpus_per_worker, scale.min_workers,
                                 what=f"run {scale.name}", wait=scale.wait_for_autoscaler,
                                 timeout_s=scale.wait_timeout, log=log)
    from mlc.train.replay import write_config
    if fresh:
        replace_run(run_url, log)
    if previous is None:  # a resume rewrites config.json only once it has succeeded (at the end)
        write_config(run_url, "train", local=False, train=given.replace(output=output), scale=scale)
    gpus = per_worker.get("GPU", 0.0)
    workers = f"{scale.min_workers}..{scale.max_workers} (elastic)" if scale.elastic else str(scale.num_workers)
    log(f"Ray Train: {workers} workers x {cluster.fmt_resources(per_worker)} "
        f"({'NCCL on GPUs' if gpus else 'gloo on CPUs'}), global batch {cfg.batch_size}, run folder {run_url}, "
        f"up to {scale.max_failures} restarts")
    trainer = build_trainer(cfg, run_url, name=scale.name, storage_root=output, per_worker=per_worker,
                            num_workers=scale.num_workers, max_failures=scale.max_failures,
                            keep_checkpoints=scale.keep_checkpoints, resize_check_s=scale.resize_check_s,
                            driver_host=ray.util.get_node_ip_address(), progress=progress, on_step=on_step)
    result = trainer.fit()  # raises ray.train.TrainingFailedError once the restarts are used up

    best = _best_epoch(result)
    publish_best(run_url, best, storage.join(run_url, "best"))
    latest = load_training_state(latest_epoch_checkpoint(run_url))
    trained = result.return_value or {}
    last_world = int(trained.get("workers") or latest["history"][-1].get("workers") or scale.min_workers)

    def score_test(best_url, ids, captions, tokenizer):
        # On the cluster's workers (their GPUs), not on the driver, which may be a small CPU head node.
        from mlc.train.checkpoint import load_model_checkpoint
        from mlc.distributed.predict import score_distributed
        state, vocab, meta = load_model_checkpoint(best_url)
        # Scoring batches are per actor: the training run's per-worker share of the global batch, twice.
        per_actor = max(1, 2 * -(-cfg.batch_size // last_world))
        return score_distributed(state, ids, data.paths.images, TrainConfig.from_dict(meta["config"]), len(vocab),
                                 num_workers=last_world, gpus_per_worker=gpus, batch_size=per_actor, log=log,
                                 progress=progress, captions=captions, tokenizer=tokenizer)

    summary = finish(cfg, run_url, data, latest["history"], latest.get("bad_images", {}), t_start=t_start,
                     score_test=score_test, log=log, progress=progress, workers=last_world,
                     device=trained.get("device"), precision=trained.get("precision"),
                     driver=socket.gethostname())
    if previous is not None:
        write_config(run_url, "train", local=False, train=given.replace(output=output), scale=scale)
    return summary


def _best_epoch(result) -> int:
    """The best of the checkpoints Ray Train kept (never one it has deleted)."""
    kept = [(epoch_of(c.path), m) for c, m in (result.best_checkpoints or [])]
    try:
        return best_of(kept)[0]
    except LookupError:
        raise RuntimeError(f"the run at {result.path} finished without a scored checkpoint") from None
