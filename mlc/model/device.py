"""Where a process computes when nobody assigned it a device: the first GPU, else the CPU, and its CPUs.

A Ray worker takes its device from what Ray assigned it instead (``ray.train.torch.get_device()`` in
training, :func:`mlc.distributed.predict.actor_device` in prediction), never from this rule.
"""

from __future__ import annotations

import os

import torch


def pick_device() -> torch.device:
    """This process's device when it is not a Ray worker: the first GPU, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def prepare_device(device: torch.device) -> None:
    """Per-process settings for computing on ``device``: the input shapes are fixed, so let cuDNN time its
    convolution algorithms once and keep the fastest."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def available_cpus() -> int:
    """CPUs this process may run on (its affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
