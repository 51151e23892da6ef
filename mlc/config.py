"""Run configuration: frozen dataclasses for a training run, its Ray scale and a sweep.

Each field carries its command-line help (``metadata["help"]``) and, where only some values are allowed, those
values (``metadata["choices"]``): validation, ``--help`` (:mod:`mlc.cli`) and docs/flags.md (checked by
tests/test_jobs.py) all read them there. Comments say why a default is what it is. A TrainConfig is saved with
every model; settings saved by earlier versions are upgraded by :func:`mlc.migrate.migrate` as they are read.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# (choices_of and parse_duration are read from here by the jobs and the loop)
from mlc.fields import bound_problems, choice_problems, choices_of, non_finite, parse_duration  # noqa: F401
from mlc.fields import field as _f

# What a network can read (mlc.model.fusion builds each).
INPUTS = ("image", "caption", "image+caption")
DEFAULT_LOSS = "asl"  # train.py's --loss and tune.py's unsearched one; the measurement: TrainConfig.loss


def uses_images(inputs: str) -> bool:
    """Whether a network that reads ``inputs`` (resolved: not auto) reads images."""
    return inputs != "caption"


def uses_captions(inputs: str) -> bool:
    """Whether a network that reads ``inputs`` (resolved: not auto) reads captions."""
    return inputs in ("caption", "image+caption")


# Said of every Ray worker, in training runs and in sweeps.
_GPUS_HELP = ("GPUs per worker: 0 (CPU workers on gloo) or a whole number (NCCL); default: 1 when the cluster's node "
              "types have GPUs, else 0")
_CPUS_HELP = ("CPUs Ray reserves per worker, from which its DataLoader processes are sized; default: 8 per GPU capped "
              "by the GPU node type's CPUs per GPU, 1 for CPU workers")
# How long a run waits for the autoscaler to add the nodes it needs (Spot GPU VMs take minutes to be granted and boot).
DEFAULT_WAIT_S = 1200.0


def check_training_gpus(gpus: float | None, flag: str = "--gpus-per-worker") -> None:
    """Training workers take no GPU, or whole GPUs: two DDP ranks on one GPU make NCCL fail at init
    ("Duplicate GPU detected")."""
    if gpus is None:
        return
    if gpus < 0 or (gpus > 0 and (gpus < 1 or gpus != int(gpus))):
        raise ValueError(f"{flag} must be 0 or a whole number >= 1 for training, got {gpus:g}: two training "
                         "ranks sharing one GPU make NCCL fail at start (duplicate GPU); prediction "
                         "(jobs/predict.py) accepts fractions")


_WAIT_FOR_AUTOSCALER_HELP = ("wait for nodes even when no autoscaler config is readable here (an autoscaler this "
                             "process cannot see, e.g. KubeRay's, will add them); with one readable, waiting is "
                             "automatic")


def _worker_problems(gpus: float | None, cpus: float | None, wait_timeout: float) -> list:
    """What is wrong with a Ray worker's resources and the wait for them (training runs and sweeps alike)."""
    problems = []
    try:
        check_training_gpus(gpus)
    except ValueError as e:
        problems.append(str(e))
    if cpus is not None and cpus <= 0:
        problems.append(f"--cpus-per-worker must be > 0, got {cpus}")
    if wait_timeout < 0:
        problems.append(f"--wait-timeout must be >= 0, got {wait_timeout}")
    return problems


@dataclass(frozen=True)
class TrainConfig:
    # Where things are. data=None means the embedded demo dataset (generated offline into a cache).
    data: str | None = _f(None,
        "dataset root URL (local path, file://, gs://bucket/prefix, memory://...) holding train.csv, test.csv and "
        "data/<ImageID>; omit it to use the embedded demo dataset (generated offline into ~/.cache/mlc)")
    output: str = _f("runs/mlc",
        "where the run writes checkpoint/, best/, metrics.json, predictions.csv, probabilities.csv, plots/")
    images: str | None = _f(None, "image folder, inside --data when relative (e.g. images); default <data>/data")
    train_csv: str | None = _f(None, "labelled table (ImageID,Labels,Caption), a path or URL; default <data>/train.csv")
    test_csv: str | None = _f(None, "table to predict (ImageID[,Caption]), a path or URL; default <data>/test.csv")

    # What the network reads. auto: image+caption when the training table has captions (they are strong
    # evidence: a caption-only model beats the report's image model on COMP5329), else image.
    inputs: str = _f("auto",
        "what the network reads: image (ResNet50), caption (a bag of caption words, bigrams and character trigrams;"
        " never opens an image), image+caption (both, fused before the head), or auto: image+caption when the "
        "training table has non-empty captions, else image", choices=("auto", *INPUTS))

    # Model. torchvision's ResNet50 stays the default: every earlier checkpoint is one, and loads unchanged.
    model: str = _f("resnet50",
        "image backbone: resnet50 (torchvision's ResNet50) or any timm model name (convnext_atto, efficientnet_b0, "
        "...; needs the optional extra: pip install 'mlc[timm]'), with a head sized to the labels")
    # Depth 1 (layer4 + head) is the report's choice; 4 trains everything, stem included.
    weights: str = _f("imagenet",
        "initial weights: imagenet (torchvision IMAGENET1K_V2, downloaded to torchvision's cache), none (random init), "
        "or a path/URL to a state dict")
    unfrozen_depth: int = _f(1,
        "how many of the backbone's last stages train: 0 = head only, 1 = the last stage + head (ResNet50: layer4, "
        "the report), ...; at or above its stage count (ResNet50: 4; a timm model: its coarse parameter groups "
        "between stem and head) every stage including the stem; frozen stages keep BatchNorm in eval mode",
        bounds=">= 0")
    # The report's dropout before its trainable part (layer4).
    dropout: float = _f(0.5,
        "dropout where the frozen features enter the trainable part (none at depth 4, where nothing is frozen)",
        bounds="[0, 1)")
    # Off: BatchNorm trains where its stage trains; on suits tiny per-GPU batches.
    freeze_bn: bool = _f(False,
        "keep every BatchNorm layer in eval mode (pretrained running statistics, no batch statistics)")

    # Optimisation.
    epochs: int = _f(10, "total epochs (a rerun may raise it to train further)", bounds=">= 1")
    # Fits ResNet50 at 224 px in 8 GB with bf16 on one GPU.
    batch_size: int = _f(32,
        "images per optimizer step; in a Ray run global: summed over all workers, dealt out to them (uneven shares when"
        " they do not divide it), so the data order and the learning-rate schedule are the same at any --num-workers, "
        "also after an elastic resize or a resume on fewer workers", bounds=">= 1")
    # AdamW peak; a fresh head on frozen features tolerates a high rate.
    lr: float = _f(1e-3, "peak learning rate (after warm-up; cosine decay to 0)", bounds="> 0")
    # AdamW's usual default; not applied to BatchNorm and biases.
    weight_decay: float = _f(0.01, "decoupled weight decay on conv/linear weights", bounds=">= 0")
    optimizer: str = _f("adamw", "adamw or sgd (Nesterov)", choices=("adamw", "sgd"))
    momentum: float = _f(0.9, "SGD momentum", bounds="[0, 1)")
    # DEFAULT_LOSS, asl: with captions read (--inputs auto on captioned tables) it matched or beat bce in samples F1
    # and beat it in macro F1 (jobs/compare_recipes.py, 3 paired seeds, docs/measurements-recipe.md); image-only
    # from scratch it scored lower (the demo keeps bce). A config.json from before --loss replays bce (migrate).
    loss: str = _f(DEFAULT_LOSS,
        "training loss: bce (binary cross-entropy), asl (asymmetric loss, Ridnik et al. 2021: easy negatives "
        "down-weighted by --asl-gamma-neg, the easiest cut off by --asl-clip) or focal (Lin et al. 2017, "
        "--focal-gamma on both sides)", choices=("bce", "asl", "focal"))
    # The paper's setting for MS-COCO (gamma- 4, gamma+ 0, clip 0.05), the labels this seed's are drawn from.
    asl_gamma_neg: float = _f(4.0, "asl: focusing exponent of the negatives", bounds=">= 0")
    asl_gamma_pos: float = _f(0.0, "asl: focusing exponent of the positives", bounds=">= 0")
    asl_clip: float = _f(0.05, "asl: probability margin under which a negative costs nothing (0: none)",
                         bounds="[0, 1)")
    # Lin et al.'s choice for detection.
    focal_gamma: float = _f(2.0, "focal: focusing exponent", bounds=">= 0")
    pos_weight: str = _f("none",
        "weight of each label's positives in the loss: none, or auto: its negatives over its positives in the "
        "training split, capped at 10 (mlc.train.losses.POS_WEIGHT_CAP)", choices=("none", "auto"))
    # Off: 0.999, timm's usual decay, moved samples F1 by +0.0001 ± 0.0001 (docs/measurements-recipe.md).
    ema: float = _f(0.0,
        "exponential moving average of the weights with this decay per optimizer step (timm's warm-up: at step t "
        "the decay is min(DECAY, (1+t)/(10+t))); validation, best/ and the predictions use the averaged weights; "
        "0 = off", bounds="[0, 1) (0: off)")
    # Warm-up protects pretrained stages from the random head's gradients.
    warmup_epochs: float = _f(1.0, "linear warm-up length in epochs (may be fractional)", bounds=">= 0")
    clip_grad: float = _f(1.0, "maximum gradient norm; 0 turns clipping off", bounds=">= 0 (0: no clipping)")
    # auto: on GPUs bf16 where the card computes it natively (sm80+), fp16 with a GradScaler below; on CPUs
    # whichever of bf16 and fp32 a short timed probe finds faster on this machine (cached per machine).
    amp: str = _f("auto",
        "mixed precision: auto (GPU: bf16 on sm80+, fp16 with loss scaling below; CPU: bf16 or fp32, whichever a short "
        "timed probe finds faster, cached per machine), bf16, fp16, or off", choices=("auto", "bf16", "fp16", "off"))
    # torch.compile of the training model. auto: compiled on a GPU when the planned run is long enough to pay
    # the compile back (mlc.model.compiling, from compile times and speed-ups measured on an H200); never on a
    # CPU, where it was measured not to pay (2-core dev CPU: 28 s to compile, 23.5 vs 24.2 img/s, depth 1).
    compile: str = _f("auto",
        "torch.compile the training model: auto (on a GPU when the planned images are enough to pay back the "
        "compile time; off on CPUs, where it was measured not to pay), on, or off", choices=("auto", "on", "off"))

    # Data. The size is ResNet50's ImageNet resolution; the COMP5329 images are <= 320 px.
    image_size: int = _f(224, "training crop and evaluation centre-crop size in pixels",
                         bounds=">= 32 (ResNet50 downsamples 32x)")
    # Off: flip doubles the scoring time (1.93x with ResNet50, docs/measurements-cpu.md), and its gain in accuracy
    # on these data is not yet measured.
    tta: str = _f("none",
        "test-time augmentation of validation and the test predictions: none, or flip: the mean of each image's "
        "and its mirror's probabilities (twice the scoring time; caption-only networks ignore it)",
        choices=("none", "flip"))
    val_fraction: float = _f(0.1, "fraction of train.csv held out for validation (see --split)", bounds="(0, 1)")
    # Stratified: each label's share of the rows nearer the same in training and validation (the real table, 20%
    # held out, seeds 0-4: largest gap 0.0038 +- 0.0016 against 0.0079 +- 0.0012 for the hash split,
    # docs/measurements-accuracy.md).
    # A config.json written before --split existed replays with hash (mlc.migrate.ADDED).
    split: str = _f("stratified",
        "how --val-fraction of the rows is held out: stratified (iterative stratification, Sechidis et al. 2011: "
        "each label's share the same in both parts) or hash (a keyed hash of each ImageID); both seeded by --seed "
        "and independent of the rows' order", choices=("stratified", "hash"))
    refit: str | None = _f(None,
        "a finished run's folder: train on every labelled row (nothing held out) with that run's settings for its "
        "best epoch's number of epochs, keep its threshold, and write the submission; flags given override its "
        "settings, and --output must be a new folder")
    val_table: str | None = _f(None,
        "a labelled table of one's own (ImageID,Labels[,Caption], a path or URL) to validate on, its images in the "
        "same image folder; then every row of train.csv trains, and --val-fraction and --split are not used")
    seed: int = _f(0, "seed of the split, the initialisation, the data order and the augmentations")
    # None: resolved where the training process runs, from the CPUs it may use (Ray's reservation or the
    # process's CPU affinity), never on the machine that parsed the flags (mlc.data.loader.resolve_loader_workers).
    loader_workers: int | None = _f(None,
        "DataLoader worker processes per training process; default: chosen where the process runs, from the CPUs it may"
        " use (Ray's reservation per worker, or this process's CPU affinity)", bounds=">= 0")
    # The decode-once store (mlc.data.store): auto keeps decoded images in memory when they fit half of what
    # the node has free, else on local disk when half its free space holds them, else streams as without it.
    store: str = _f("auto",
        "keep every training image decoded, once per node, for later epochs, validation and sweep trials: auto "
        "(memory if it fits --store-budget, else local disk ($MLC_STORE_DIR) if it fits half its free space, else "
        "off), memory, disk, or off (read and decode every epoch)", choices=("auto", "memory", "disk", "off"))
    store_budget: float | None = _f(None,
        "GiB of memory the decoded-image store may take on a node; default auto: half of what is free when the "
        "run starts", bounds=">= 0 GiB")
    # Off: an empty Labels cell is an image with none of the labels, which real multi-label data has (COCO ~1%,
    # mostly negatives in defect or moderation sets); dropping such rows teaches the model to over-predict.
    require_labels: bool = _f(False,
        "refuse a training row whose Labels field is empty, naming its line (default: such a row is an image "
        "with none of the labels, trained on as an all-negative example)")
    max_bad_fraction: float = _f(0.01, "stop when more than this fraction of labelled images is unreadable",
                                 bounds="[0, 1]")
    max_image_pixels: int = _f(50_000_000, "refuse images with more pixels than this (decompression bombs)",
                               bounds=">= 1")

    # Spot VMs are reclaimed at any moment: a step checkpoint is taken on notice (Ray's preemption notice,
    # SIGTERM/SIGINT) and, for kills without one, at least this often. auto: 50 times the last checkpoint's
    # write time (so writing them costs at most 2% of training), at least a minute (mlc.train.interrupts).
    checkpoint_every: str = _f("auto",
        "a step checkpoint at least this often inside an epoch, for kills without notice: a duration (90s, 10m, "
        "1h), epoch (at epoch ends only), or auto: 50 times the last checkpoint's write time, so that they cost at "
        "most 2 percent of the training time, and at least 1 minute")
    # None: the share of the global batch at the run's first world size, so a resume on fewer workers (a lost
    # Spot node) accumulates gradients instead of growing each GPU's batch past what fitted.
    micro_batch: int | None = _f(None,
        "rows per forward pass of one process: a larger share of the global batch (fewer workers after a node is "
        "lost) is split into passes whose gradients are accumulated; default: the share at the run's first world "
        "size", bounds=">= 1")

    # Settings that may change between a run and its resume without invalidating the checkpoint.
    RESUMABLE_CHANGES = ("epochs", "loader_workers", "output", "data", "images", "train_csv", "test_csv", "compile",
                         "store", "store_budget", "require_labels", "checkpoint_every", "micro_batch")

    def __post_init__(self):
        problems = non_finite(self) + choice_problems(self) + bound_problems(self)
        if self.checkpoint_every not in ("auto", "epoch") and parse_duration(self.checkpoint_every) is None:
            problems.append(f"--checkpoint-every must be a duration (90s, 10m, 1h), epoch or auto, got "
                            f"{self.checkpoint_every!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config from a dict in today's shape (files are upgraded by :func:`mlc.migrate.migrate` as they are
        read). A key this version does not know (a file written by a newer one) is named, then ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            from mlc.logs import say
            say(f"warning: ignoring setting(s) this version of mlc does not have: {', '.join(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def differences(self, other: "TrainConfig") -> dict:
        """Settings that differ and would make resuming ``other`` with ``self`` train a different model."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (b[k], a[k]) for k in a if a[k] != b[k] and k not in self.RESUMABLE_CHANGES}


@dataclass(frozen=True)
class ScaleConfig:
    # An int: a fixed group. (MIN, MAX) (--num-workers MIN-MAX): elastic, Ray Train starts with what fits
    # (at least MIN), grows as nodes arrive and shrinks when they go; --batch-size stays the global batch.
    # Two workers: the smallest group that exercises DDP.
    num_workers: int | tuple = _f(2,
        "Ray Train workers (one process each, one per GPU on GPUs): N, or MIN-MAX for an elastic group that starts with"
        " what fits (at least MIN), grows as nodes arrive and, when nodes are lost, continues from the latest "
        "checkpoint on fewer (each shrink is one of --max-failures)")
    gpus_per_worker: float | None = _f(None, _GPUS_HELP)
    cpus_per_worker: float | None = _f(None, _CPUS_HELP)
    max_failures: int = _f(3,
        "worker-group failures (a lost node without notice included) recovered from the latest checkpoint before the "
        "run fails; -1: no limit", bounds=">= -1 (-1: unlimited)")
    # Unlimited: a Spot cluster loses nodes as a matter of course, and each notice costs at most a step.
    max_preemptions: int = _f(-1,
        "preemptions (a node drained as preempted, as Spot VMs are) recovered from the checkpoint taken on notice, "
        "counted apart from --max-failures; -1: no limit", bounds=">= -1 (-1: unlimited)")
    name: str = _f("mlc",
        "stable run name: outputs and checkpoints go under --output/NAME/, and a rerun with the same name resumes")
    keep_checkpoints: int = _f(2,
        "checkpoints kept by validation F1 in the run folder (Ray Train also always keeps the latest)", bounds=">= 1")
    wait_for_autoscaler: bool = _f(False, _WAIT_FOR_AUTOSCALER_HELP)
    wait_timeout: float = _f(DEFAULT_WAIT_S,
        "seconds to wait for the autoscaler to add the first workers' nodes before giving up")
    resize_check_s: float = _f(60.0, "elastic groups: seconds between Ray Train's checks for room to grow",
                               bounds="> 0")

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
        problems = non_finite(self) + bound_problems(self) + _worker_problems(self.gpus_per_worker,
                                                                                self.cpus_per_worker, self.wait_timeout)
        n = self.num_workers
        if isinstance(n, list):
            object.__setattr__(self, "num_workers", n := tuple(n))
        if isinstance(n, tuple) and n[0] == n[1]:
            object.__setattr__(self, "num_workers", n := n[0])
        if not (isinstance(n, int) or (isinstance(n, tuple) and len(n) == 2 and all(isinstance(x, int) for x in n))):
            problems.append(f"--num-workers must be N or MIN-MAX, got {n!r}")
        elif self.min_workers < 1 or self.max_workers < self.min_workers:
            problems.append(f"--num-workers must be >= 1 (MIN-MAX with 1 <= MIN <= MAX), got {n!r}")
        if not self.name or "/" in self.name or self.name in (".", ".."):
            problems.append(f"--name must be a non-empty folder name without '/', got {self.name!r}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class SweepConfig:
    """A Ray Tune sweep (mlc.distributed.tune) over learning rate and unfrozen depth, with ASHA early stopping."""

    name: str = _f("sweep",
        "stable sweep name: everything goes under --output/NAME/, and a rerun with the same name resumes")
    num_samples: int = _f(8, "trials to run", bounds=">= 1")
    # one Ray Train worker (one GPU) per trial: more trials at once
    workers_per_trial: int = _f(1, "Ray Train workers per trial (each one GPU when the cluster has GPUs)", bounds=">= 1")
    gpus_per_worker: float | None = _f(None, _GPUS_HELP)
    cpus_per_worker: float | None = _f(None, _CPUS_HELP)
    max_epochs: int = _f(10, "epochs of a trial that ASHA never stops", bounds=">= 1")
    # ASHA lets every trial run this many epochs before it may stop it
    grace_epochs: int = _f(1, "epochs every trial runs before ASHA may stop it")
    # ASHA keeps the top 1/3 at each rung
    reduction_factor: int = _f(3, "ASHA keeps the best 1/FACTOR of trials at each rung", bounds=">= 2")
    # the learning-rate range, sampled log-uniformly
    lr_min: float = _f(1e-4, "lowest peak learning rate (log-uniform range)")
    lr_max: float = _f(1e-2, "highest peak learning rate (equal to --lr-min: a fixed rate)")
    depths: tuple = _f((0, 1, 2, 3, 4), "unfrozen depths to sample from, comma-separated, each >= 0 (see "
                       "jobs/train.py --unfrozen-depth)")
    # auto: as jobs/train.py decides (image+caption when the table has captions); several: a searched choice.
    inputs: tuple = _f(("auto",), "what the trials' networks read, comma-separated: auto, image, caption, "
                       "image+caption; more than one makes it a searched choice")
    # The loss and its parameters (jobs/train.py --loss, --asl-gamma-neg, --pos-weight): one value is fixed, several
    # a searched choice; the defaults are jobs/train.py's.
    loss: tuple = _f((DEFAULT_LOSS,), "training losses to sample from, comma-separated among bce, asl, focal (see "
                     "jobs/train.py --loss); more than one makes it a searched choice")
    asl_gamma_neg: tuple = _f((4.0,), "asl: focusing exponents of the negatives to sample from, comma-separated, "
                              "each >= 0")
    pos_weight: tuple = _f(("none",), "positives' weights to sample from, comma-separated among none, auto")
    # 3, as jobs/train.py's: a trial is a Ray Train run and loses Spot nodes like one; a trial that keeps
    # failing still ends as an errored trial and the sweep goes on without it.
    max_failures: int = _f(3, "worker-group restarts per trial from its latest checkpoint (a lost Spot node "
                           "included), as jobs/train.py's --max-failures; -1: no limit", bounds=">= -1 (-1: unlimited)")
    search_seed: int = _f(0, "seed of the random search")
    wait_for_autoscaler: bool = _f(False, _WAIT_FOR_AUTOSCALER_HELP)
    wait_timeout: float = _f(DEFAULT_WAIT_S,
        "seconds to wait for the autoscaler to add the first trial's nodes before giving up")

    def __post_init__(self):
        problems = non_finite(self) + bound_problems(self) + _worker_problems(self.gpus_per_worker,
                                                                                self.cpus_per_worker, self.wait_timeout)
        if not 1 <= self.grace_epochs <= self.max_epochs:
            problems.append(f"--grace-epochs must be in 1..--max-epochs ({self.max_epochs}), got {self.grace_epochs}")
        if not 0 < self.lr_min <= self.lr_max:
            problems.append(f"--lr-min and --lr-max must satisfy 0 < min <= max, got {self.lr_min}, {self.lr_max}")
        if isinstance(self.inputs, str):
            object.__setattr__(self, "inputs", tuple(x for x in self.inputs.split(",") if x))
        elif isinstance(self.inputs, list):  # read back from a config.json
            object.__setattr__(self, "inputs", tuple(self.inputs))
        if not self.inputs or any(x not in ("auto", *INPUTS) for x in self.inputs):
            problems.append(f"--inputs must be values among auto, {', '.join(INPUTS)}, got {','.join(self.inputs)}")
        problems += self._searched_loss_problems()
        if not self.depths or any(not isinstance(d, int) or d < 0 for d in self.depths):
            problems.append(f"--depths must be whole numbers >= 0, got {list(self.depths)}")
        if not self.name or "/" in self.name:
            problems.append(f"--name must be a non-empty folder name without '/', got {self.name!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def _searched_loss_problems(self) -> list:
        """The loss choices as tuples (a flag's comma-separated text, a config.json's list), each value allowed."""
        problems = []
        for name, kind in (("loss", str), ("asl_gamma_neg", float), ("pos_weight", str)):
            values = getattr(self, name)
            if isinstance(values, str):
                values = [x.strip() for x in values.split(",") if x.strip()]
            values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
            try:
                values = tuple(kind(v) for v in values)
            except ValueError:
                problems.append(f"--{name.replace('_', '-')} must be comma-separated numbers, got {values}")
                continue
            object.__setattr__(self, name, values)
            allowed = choices_of(TrainConfig, name)
            if not values or (allowed and any(v not in allowed for v in values)) or (
                    kind is float and any(not math.isfinite(v) or v < 0 for v in values)):
                rule = f"values among {', '.join(allowed)}" if allowed else "finite numbers >= 0"
                problems.append(f"--{name.replace('_', '-')} must be {rule}, got {','.join(map(str, values))}")
        return problems
