"""``jobs/pack.py`` on Ray Data: every shard of a pack (:mod:`mlc.data.pack_write`) written by a Ray Data task, on
the CPUs of every node of the cluster in RAY_ADDRESS (CPU-only nodes included), or of a local Ray.

The driver reads the tables, writes the plan, hands out one shard per task and writes the manifest from what
the tasks return. Each task reads its rows' images (many requests in flight), decodes, fits and encodes them,
and uploads its shard whole.
"""

from __future__ import annotations

import os
import time

from mlc.data.pack_write import PackConfig, finish_pack, said_shard, start_pack, write_shard

# See mlc/distributed/predict.py: Ray Data's usage poller otherwise outlives ray.shutdown().
os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")


def _write(batch: dict, *, output: str, plan: dict, frames, images: str, max_pixels: int) -> dict:
    """A Ray Data task's work: each shard spec of its batch (one) written; ``frames`` the tables' object ref."""
    import numpy as np
    import ray
    tables = ray.get(frames)
    results = []
    for table, k, start, end in zip(batch["table"], batch["k"], batch["start"], batch["end"]):
        spec = {"table": str(table), "k": int(k), "start": int(start), "end": int(end)}
        results.append({**spec, **write_shard(output, plan, spec, tables[spec["table"]], images, max_pixels)})
    return {"result": np.array(results, dtype=object)}


def pack(cfg: PackConfig, log=print, progress: bool = True) -> dict:
    """Pack ``cfg.data`` into ``cfg.output``; returns the manifest. A pack already complete for the same source is
    left as it is; an unfinished one is resumed."""
    import ray
    import ray.data

    from mlc.distributed.cluster import ensure_ray
    job = start_pack(cfg, log)
    if job.done is not None:
        return job.done
    ensure_ray(log)
    start = time.perf_counter()
    context = ray.data.DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, progress
    try:
        ds = ray.data.from_items(job.plan["shards"], override_num_blocks=len(job.plan["shards"]))
        done = ds.map_batches(_write, fn_kwargs=dict(output=cfg.output, plan=job.plan, frames=ray.put(job.source.frames),
                                                     images=job.source.images, max_pixels=cfg.max_image_pixels),
                              batch_size=1, num_cpus=cfg.cpus_per_task, batch_format="numpy")
        results = []
        for batch in done.iter_batches(batch_size=None, batch_format="numpy"):
            for r in batch["result"]:
                results.append(r)
                said_shard(r, len(results), len(job.plan["shards"]), log)
    finally:
        context.enable_progress_bars = bars
    return finish_pack(cfg, job, results, time.perf_counter() - start, log)
