"""Ray Train (the V2 API): the one module that touches Ray Train.

The driver (``fit_distributed``) takes the run driver's steps (:func:`mlc.train.driver.drive`, as local mode
does) with :class:`RayMode`: it starts a ``TorchTrainer`` whose workers run :func:`mlc.train.loop.train` with
:class:`RayGroup`, then copies the best checkpoint to ``<run>/best`` and writes the same outputs as local
mode. Each epoch rank 0 reports a checkpoint folder that holds
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

import contextlib
import math
import os
import socket
import tempfile
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from mlc.config import ScaleConfig, TrainConfig
from mlc.data.demo import with_demo_data
from mlc.data.run_data import RunData, prepare_data, test_images
from mlc.distributed import cluster
from mlc.distributed.ray_folder import ray_storage
from mlc.errors import UsageError
from mlc.io import storage
from mlc.io.config_json import write_config
from mlc.io.lock import LOCK_NAME
from mlc.logs import verbosity
from mlc.model.checkpoint import load_state, save_state
from mlc.model.resnet import check_weights_found
from mlc.train import refit
from mlc.train.driver import drive
from mlc.train.group import EpochEnd, write_epoch
from mlc.train.interrupts import Notice
from mlc.train.loop import Trained, train
from mlc.train.outputs import SCALAR_KEYS, write_metrics
from mlc.train.run_folder import SCORE, best_of, epoch_dir, epoch_of, latest_epoch_checkpoint, publish_best

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
    """This Ray Train worker's place in the group (:class:`mlc.train.group.Group`): rank, device, DDP and gathering
    over Ray Train's process group, the resume state from ``ray.train.get_checkpoint()``, and each epoch's
    checkpoint reported to Ray Train."""

    def __init__(self, run_url: str, driver_host: str, tensorboard_url: str | None = None):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.run_url = self.progress_url = run_url
        self.tensorboard_url = tensorboard_url or storage.join(run_url, "tensorboard")
        self.device = ray.train.torch.get_device()
        # The CPUs Ray reserved for this worker: the loader's processes are sized from them.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        self.cpus = int(cpus) if cpus else None
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

    def latest(self) -> tuple[dict | None, str]:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None, self.run_url
        with ckpt.as_directory() as d:
            return load_state(d), f"checkpoint {os.path.basename(ckpt.path.rstrip('/'))} of {self.run_url}"

    def end_epoch(self, end: EpochEnd) -> None:
        """Every rank reports (a barrier); rank 0 with the epoch's folder, which Ray Train keeps or deletes."""
        metrics = {"epoch": end.epoch, **{k: end.metrics[k] for k in SCALAR_KEYS},
                   "train_loss": end.metrics["train_loss"], "val_loss": end.metrics["val_loss"],
                   "threshold_strategy": end.model_meta["threshold"]["strategy"],
                   "threshold_value": _scalar_threshold(end.model_meta["threshold"]), "workers": self.world,
                   SCORE: end.score}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="mlc-ckpt-") as d:
            write_epoch(d, end, state=True, model=True)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=epoch_dir(end.epoch))
        # Progress for whoever watches the run folder; the driver rewrites it, complete, at the end.
        write_metrics(self.run_url, end.state["history"], end.cfg, complete=False)

    def listening(self):
        return contextlib.nullcontext()  # a Ray worker hears of a reclaimed node through Ray

    def poll(self, due: bool, next_poll: int) -> tuple[Notice | None, bool, int]:
        """Ray's preemption notice and rank 0's decisions, as rank 0 sees them, on every rank.

        ``get_preemption_info()`` is a barrier every rank calls at the same steps, and returns rank 0's view; the
        view goes with rank 0's decisions over the process group (gloo or NCCL) too, so that every rank acts
        on one notice even where Ray's barriers were relaxed (they are not: see build_trainer)."""
        info = ray.train.get_preemption_info()
        mine = [float(due), float(next_poll), float(info is not None),
                float(info.deadline_ms) / 1000 if info is not None and info.deadline_ms else -1.0]
        if self.world > 1:
            agreed = torch.tensor(mine, dtype=torch.float64, device=self.device)
            dist.broadcast(agreed, src=0)
            mine = agreed.tolist()
        notice = Notice("preemption", deadline_s=mine[3] if mine[3] > 0 else None) if mine[2] else None
        return notice, bool(mine[0]), int(mine[1])

    def keep_step(self, state: dict) -> None:
        """A step checkpoint, reported (every rank; rank 0 with the folder) without a validation score: Ray Train
        ranks it below every epoch's and deletes it once a later checkpoint comes. Without ``epoch`` among its
        metrics, Tune's ASHA passes it by."""
        metrics = {"epochs_done": state["epoch"], "step": state["step"], "reason": state["reason"], SCORE: math.nan}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="mlc-ckpt-") as d:
            save_state(d, state)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d),
                             checkpoint_dir_name=epoch_dir(state["epoch"], state["step"]))


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
    group = RayGroup(config["run_url"], config["driver_host"], config.get("tensorboard_url"))
    data = prepare_data(cfg, say if group.rank == 0 else (lambda *_: None))
    out = train(cfg, group, data, progress=config["progress"], on_step=config.get("on_step"), log=say)
    return {"device": str(out.device), "precision": out.precision, "workers": group.world}


def build_trainer(cfg: TrainConfig, run_url: str, *, name: str, storage_root: str, per_worker: dict,
                  num_workers, max_failures: int, keep_checkpoints: int, resize_check_s: float = 60.0,
                  max_preemptions: int = -1,
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
            # Preemptions are counted apart from failures. Collectives stay strict (relax_collectives_on_preemption
            # off): every rank, the preempted ones too, takes the step checkpoint together within seconds of the
            # notice, well inside the drain window, so relaxing helps nothing; and once Ray relaxes its barriers
            # the preempted ranks' next Ray collective waits on survivors that have gone on to the process
            # group's collectives, a deadlock until the deadline (seen in tests/test_ray_train.py).
            failure_config=FailureConfig(max_failures=max_failures, max_preemption_failures=max_preemptions),
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
    cluster.ensure_ray(log)  # the cluster in RAY_ADDRESS (as under `ray job submit`), else a new local Ray
    given = cfg  # as the caller gave it: data=None (the demo set) stays None in config.json
    cfg = with_demo_data(cfg, log)
    output = absolute_output(cfg.output)
    run_url = storage.join(output, scale.name)
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    check_shared_output(run_url, hosts | {ray.util.get_node_ip_address()})
    mode = RayMode(given.replace(output=output), scale, run_url, output, log=log, progress=progress, on_step=on_step)
    return drive(cfg.replace(output=run_url), run_url, mode, fresh=fresh, log=log, progress=progress)


class RayMode:
    """The run driver's Ray side (:class:`mlc.train.driver.Mode`): the run folder is ``--output/--name``, the
    driver is its one writer, and training is a Ray Train run the driver waits on."""

    def __init__(self, given: TrainConfig, scale: ScaleConfig, run_url: str, output: str, *, log, progress: bool,
                 on_step=None):
        self.given, self.scale, self.run_url, self.output = given, scale, run_url, output
        self.log, self.progress, self.on_step = log, progress, on_step
        self.what = f"Ray Train run {scale.name}"
        self.per_worker: dict = {}

    def previous(self) -> str | None:
        return latest_epoch_checkpoint(self.run_url)

    def before_start(self, cfg: TrainConfig, data: RunData) -> None:
        check_weights_found(cfg.weights)
        s = self.scale
        self.per_worker, _ = plan_workers(s.gpus_per_worker, s.cpus_per_worker, s.min_workers, what=f"run {s.name}",
                                          wait=s.wait_for_autoscaler, timeout_s=s.wait_timeout, log=self.log)

    def owned(self) -> list[str]:
        """Everything in the run folder (Ray's records too), but the lock."""
        return [n for n in storage.listdir(self.run_url) if n != LOCK_NAME] if storage.isdir(self.run_url) else []

    def write_config(self) -> None:
        write_config(self.run_url, "train", local=False, train=self.given, scale=self.scale,
                     refit=refit.section(self.given))

    def train(self, cfg: TrainConfig, data: RunData) -> tuple[Trained, dict]:
        s, gpus = self.scale, self.per_worker.get("GPU", 0.0)
        workers = f"{s.min_workers}..{s.max_workers} (elastic)" if s.elastic else str(s.num_workers)
        self.log(f"Ray Train: {workers} workers x {cluster.fmt_resources(self.per_worker)} "
                 f"({'NCCL on GPUs' if gpus else 'gloo on CPUs'}), global batch {cfg.batch_size}, run folder "
                 f"{self.run_url}, up to {s.max_failures} restarts after failures and "
                 f"{'any number' if s.max_preemptions < 0 else s.max_preemptions} after preemptions")
        trainer = build_trainer(cfg, self.run_url, name=s.name, storage_root=self.output, per_worker=self.per_worker,
                                num_workers=s.num_workers, max_failures=s.max_failures,
                                max_preemptions=s.max_preemptions,
                                keep_checkpoints=s.keep_checkpoints, resize_check_s=s.resize_check_s,
                                driver_host=ray.util.get_node_ip_address(), progress=self.progress,
                                on_step=self.on_step)
        result = trainer.fit()  # raises ray.train.TrainingFailedError once the restarts are used up
        publish_best(self.run_url, _best_epoch(result), storage.join(self.run_url, "best"))
        latest = load_state(latest_epoch_checkpoint(self.run_url))
        back = result.return_value or {}
        world = int(back.get("workers") or latest["history"][-1].get("workers") or s.min_workers)
        trained = Trained(latest["history"], latest["bad_images"], back.get("device"), back.get("precision"), False,
                          latest["interruptions"])
        return trained, {"score_test": self._scorer(cfg, data, world, gpus), "workers": world,
                         "driver": socket.gethostname()}

    def _scorer(self, cfg: TrainConfig, data: RunData, world: int, gpus: float):
        def score_test(best_url, ids, captions, tokenizer):
            # On the cluster's workers (their GPUs), not on the driver, which may be a small CPU head node.
            from mlc.distributed.predict import score_distributed
            from mlc.prediction.checkpoints import load_predictor
            state, vocab, model_cfg, _, _ = load_predictor(best_url)
            # Scoring batches are per actor: the training run's per-worker share of the global batch, twice.
            per_actor = max(1, 2 * -(-cfg.batch_size // world))
            return score_distributed(state, len(vocab), model_cfg, ids, test_images(data), num_workers=world,
                                     gpus_per_worker=gpus, batch_size=per_actor, log=self.log,
                                     progress=self.progress, captions=captions, tokenizer=tokenizer)
        return score_test


def _best_epoch(result) -> int:
    """The best of the checkpoints Ray Train kept (never one it has deleted)."""
    kept = [(epoch_of(c.path), m) for c, m in (result.best_checkpoints or [])]
    try:
        return best_of(kept)[0]
    except LookupError:
        raise RuntimeError(f"the run at {result.path} finished without a scored checkpoint") from None
