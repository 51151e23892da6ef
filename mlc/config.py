"""Run configuration: one frozen dataclass, built by the jobs' argument parsers and saved with every model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    # Where things are. data=None means the embedded demo dataset (generated offline into a cache).
    data: str | None = None
    output: str = "runs/mlc"
    images: str | None = None       # default: <data>/data, as in the original COMP5329S1A2Dataset
    train_csv: str | None = None    # default: <data>/train.csv
    test_csv: str | None = None     # default: <data>/test.csv

    # Model. Depth 1 (layer4 + head) is the report's choice; 4 trains everything, stem included.
    weights: str = "imagenet"
    unfrozen_depth: int = 1
    dropout: float = 0.5            # the report's dropout before its trainable part (layer4)
    freeze_bn: bool = False         # BatchNorm trains where its stage trains; True suits tiny per-GPU batches

    # Optimisation.
    epochs: int = 10
    batch_size: int = 32            # per process; fits ResNet50 at 224 px in 8 GB with bf16
    lr: float = 1e-3                # AdamW peak; a fresh head on frozen features tolerates a high rate
    weight_decay: float = 0.01      # AdamW's usual default; not applied to BatchNorm and biases
    optimizer: str = "adamw"
    momentum: float = 0.9           # SGD only
    warmup_epochs: float = 1.0      # linear warm-up protects pretrained stages from the random head's gradients
    clip_grad: float = 1.0          # max global grad norm; cuts early spikes, rarely binds after warm-up; 0 = off
    # auto: on GPUs bf16 where the card computes it natively (sm80+), fp16 with a GradScaler below; on CPUs
    # whichever of bf16 and fp32 a short timed probe finds faster on this machine (cached per machine).
    amp: str = "auto"
    # torch.compile of the training model. Off: measured on the 2-core dev CPU it took 28 s to compile and
    # trained no faster (23.5 vs 24.2 img/s, depth 1, bf16); on GPUs `jobs/bench.py --gpu` measures it.
    compile: bool = False

    # Data.
    image_size: int = 224           # ResNet50's ImageNet resolution; the COMP5329 images are <= 320 px
    val_fraction: float = 0.1
    seed: int = 0
    # None: resolved where the training process runs, from the CPUs it may use (Ray's reservation or the
    # process's CPU affinity), never on the machine that parsed the flags (mlc.engine.resolve_loader_workers).
    loader_workers: int | None = None  # per training process
    # Decode JPEGs on the GPU (nvJPEG) instead of in the loader workers, for nodes whose CPUs cannot keep up
    # with the GPU (mlc.gpu_decode). Off until measured on a GPU: `jobs/bench.py --gpu` compares the two.
    gpu_decode: bool = False
    max_bad_fraction: float = 0.01  # unreadable training images tolerated before the run stops
    max_image_pixels: int = 50_000_000  # larger images are refused as decompression bombs

    # Settings that may change between a run and its resume without invalidating the checkpoint.
    RESUMABLE_CHANGES = ("epochs", "loader_workers", "output", "data", "images", "train_csv", "test_csv", "compile",
                         "gpu_decode")

    def __post_init__(self):
        problems = []
        if not 0 <= self.unfrozen_depth <= 4:
            problems.append(f"--unfrozen-depth must be 0..4, got {self.unfrozen_depth}")
        if not 0 <= self.dropout < 1:
            problems.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.epochs < 1:
            problems.append(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            problems.append(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.image_size < 32:
            problems.append(f"--image-size must be >= 32 (ResNet50 downsamples 32x), got {self.image_size}")
        if self.optimizer not in ("adamw", "sgd"):
            problems.append(f"--optimizer must be adamw or sgd, got {self.optimizer}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            problems.append(f"--amp must be auto, bf16, fp16 or off, got {self.amp}")
        if self.loader_workers is not None and self.loader_workers < 0:
            problems.append(f"--loader-workers must be >= 0, got {self.loader_workers}")
        if not 0 <= self.max_bad_fraction <= 1:
            problems.append(f"--max-bad-fraction must be in [0, 1], got {self.max_bad_fraction}")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        if "num_workers" in d:  # checkpoints written before the DataLoader setting was renamed
            d.setdefault("loader_workers", d.pop("num_workers"))
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def differences(self, other: "TrainConfig") -> dict:
        """Settings that differ and would make resuming ``other`` with ``self`` train a different model."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (b[k], a[k]) for k in a if a[k] != b[k] and k not in self.RESUMABLE_CHANGES}


# With no --data the job trains on the embedded demo set, offline, on a CPU in a few minutes: no ImageNet
# download, small images, and the whole network trains (from scratch there is nothing worth freezing).
DEMO_DEFAULTS = {
    "output": "runs/demo",
    "weights": "none",
    "unfrozen_depth": 4,
    "dropout": 0.0,
    "image_size": 64,      # the demo images are 64 px; ResNet50 at 64 px trains at ~60 img/s on 2 CPU cores
    "epochs": 6,
    "lr": 2e-3,
    "warmup_epochs": 0.5,
    # fp32: training this small network from scratch under CPU bf16 autocast lost accuracy, measured on the
    # 2-core dev CPU (best validation F1 0.890 vs 0.957 with seed 0, 0.890 vs 0.963 with seed 1), although
    # bf16 steps were faster there. Fine-tuning ImageNet weights in bf16 is the usual practice on GPUs.
    "amp": "off",
}


def demo_config(**changes) -> TrainConfig:
    return TrainConfig(**{**DEMO_DEFAULTS, **changes})


@dataclass(frozen=True)
class ScaleConfig:
    # An int: a fixed group. (MIN, MAX) (--num-workers MIN-MAX): elastic, Ray Train starts with what fits
    # (at least MIN), grows as nodes arrive and shrinks when they go; --batch-size stays the global batch.
    num_workers: int | tuple = 2    # two workers: the smallest group that exercises DDP
    gpus_per_worker: float | None = None   # None: 1 when the cluster's node types have GPUs, else 0
    cpus_per_worker: float | None = None   # None: 8 per GPU capped by the GPU node type's CPUs per GPU; 1 on CPUs
    max_failures: int = 3           # worker-group restarts from the latest checkpoint before giving up
    name: str = "mlc"               # stable: a rerun with the same name resumes
    keep_checkpoints: int = 2       # by validation F1; Ray Train also always keeps the latest
    wait_for_autoscaler: bool = False  # wait even when no autoscaler config can be read
    wait_timeout: float = 1200.0    # seconds to wait for the autoscaler's nodes before giving up
    resize_check_s: float = 60.0    # elastic: how often Ray Train looks for room to grow the group

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    def __post_init__(self):
        from .cluster import check_training_gpus
        problems = []
        n = self.num_workers
        if isinstance(n, list):
            object.__setattr__(self, "num_workers", n := tuple(n))
        if isinstance(n, tuple) and n[0] == n[1]:
            object.__setattr__(self, "num_workers", n := n[0])
        if not (isinstance(n, int) or (isinstance(n, tuple) and len(n) == 2 and all(isinstance(x, int) for x in n))):
            problems.append(f"--num-workers must be N or MIN-MAX, got {n!r}")
        elif self.min_workers < 1 or self.max_workers < self.min_workers:
            problems.append(f"--num-workers must be >= 1 (MIN-MAX with 1 <= MIN <= MAX), got {n!r}")
        try:
            check_training_gpus(self.gpus_per_worker)
        except ValueError as e:
            problems.append(str(e))
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            problems.append(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            problems.append(f"--max-failures must be >= -1 (-1: unlimited), got {self.max_failures}")
        if self.keep_checkpoints < 1:
            problems.append(f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.wait_timeout < 0:
            problems.append(f"--wait-timeout must be >= 0, got {self.wait_timeout}")
        if self.resize_check_s <= 0:
            problems.append(f"--resize-check-s must be > 0, got {self.resize_check_s}")
        if not self.name or "/" in self.name or self.name in (".", ".."):
            problems.append(f"--name must be a non-empty folder name without '/', got {self.name!r}")
        if problems:
            raise ValueError("; ".join(problems))
