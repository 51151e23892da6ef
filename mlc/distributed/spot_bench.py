"""What Spot-native training costs (jobs/bench.py --spot): one poll for notices on Ray Train (``get_preemption_info``,
a barrier, and the agreement on rank 0's decisions), timed in a real worker group; and one checkpoint of the
training state (ResNet50 weights, AdamW moments) written as mlc writes it, at unfrozen depths 1 and 4. The
``--checkpoint-every auto`` rule (50 times a checkpoint's write time) and the poll period
(:data:`mlc.train.interrupts.POLL_PERIOD_S`) are chosen from these."""

from __future__ import annotations

import statistics
import tempfile
import time


def _poll_worker(config: dict) -> dict:
    from mlc.distributed.train import RayGroup
    group = RayGroup(config["run_url"], config["driver_host"])
    group.poll(False, 0)  # the first call sets the collectives up
    times = []
    for _ in range(config["polls"]):
        t = time.perf_counter()
        group.poll(False, 0)
        times.append(time.perf_counter() - t)
    return {"median_ms": 1000 * statistics.median(times), "p90_ms": 1000 * sorted(times)[int(0.9 * len(times))]}


def poll_cost(workers: int = 2, polls: int = 200) -> dict:
    """Median and 90th-percentile milliseconds of one poll in a group of ``workers`` CPU workers (gloo)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    with tempfile.TemporaryDirectory(prefix="mlc-spot-bench-") as folder:
        trainer = TorchTrainer(_poll_worker, train_loop_config={"run_url": folder, "polls": polls,
                                                                "driver_host": ray.util.get_node_ip_address()},
                               scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
                               run_config=RunConfig(name="spot-bench", storage_path=folder))
        return trainer.fit().return_value


def checkpoint_cost(url: str, depth: int, repeats: int = 3) -> dict:
    """Seconds to write one training state (weights and optimizer state after a step) to ``url``, best of
    ``repeats``, and its size."""
    import torch

    from mlc.model.checkpoint import save_state
    from mlc.model.resnet import build_model, trainable_parameter_groups
    from mlc.train.engine import make_optimizer
    model = build_model(18, depth, weights="none")
    opt = make_optimizer(trainable_parameter_groups(model, 0.01), "adamw", 1e-3, device=torch.device("cpu"))
    model(torch.zeros(2, 3, 64, 64)).sum().backward()
    opt.step()  # the moments exist, as in every checkpoint but the first step's
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1, "step": 1}
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        save_state(url, state)
        best = min(best, time.perf_counter() - t)
    size = sum(v.numel() * v.element_size() for v in model.state_dict().values() if torch.is_tensor(v))
    size += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {"depth": depth, "seconds": best, "mb": size / 1e6}
