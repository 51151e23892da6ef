"""Ray Tune sweep over learning rate and unfrozen depth; each trial is a Ray Train run (the Train V2 pattern).

A Tune trial is a small driver function that builds a ``TorchTrainer`` running the same worker loop
as ``jobs/train.py`` (``mlc.distributed.train``), with ``TuneReportCallback`` passing each epoch's
validation metrics to Tune, where ASHA stops the weak trials early. Every trial's checkpoints live
under ``<output>/<name>/<trial>/``.

The threshold needs no retraining: each epoch every candidate threshold (each percentile of the
grid, each global threshold, per-class thresholds) is scored on that trial's validation scores, and
the epoch reports its best, with the strategy and value, as ``f1_samples``.

At the end the sweep writes ``results.csv``, ``best_config.json``, ``plots/sweep.png`` and
``best/`` (the best trial's best checkpoint), and predicts the test table from ``best/`` by
distributed batch inference into ``predictions.csv`` and ``probabilities.csv``.

A trial's best epoch is always one of the checkpoints Ray Train kept for it (read back from the trial's
own snapshot), so ties, ordering, early stopping and errors cannot point the summary at a deleted folder.
Each trial keeps its best checkpoint and its latest (Ray Train never deletes the latest); an interrupted
sweep's trials resume from their latest. The number of trials at once is planned from the node types the
autoscaler can add (:mod:`mlc.distributed.cluster`) and enforced by the search algorithm itself.
"""

from __future__ import annotations

import io
import json
import math
import time
import pandas as pd

from mlc.distributed import cluster
from mlc.io import storage
from mlc.io.lock import hold
from mlc.config import SweepConfig, TrainConfig
from mlc.data.demo import with_demo_data
from mlc.distributed.ray_folder import kept_checkpoints, ray_storage
from mlc.train.run_folder import SCORE, best_of, publish_best

METRIC = "f1_samples"


# The loss settings a sweep may search (each fixed when given one value).
SEARCHED_LOSS = ("loss", "asl_gamma_neg", "pos_weight")


def search_space(sweep: SweepConfig) -> dict:
    from ray import tune
    lr = tune.loguniform(sweep.lr_min, sweep.lr_max) if sweep.lr_min < sweep.lr_max else sweep.lr_min
    depth = tune.choice(list(sweep.depths)) if len(sweep.depths) > 1 else sweep.depths[0]
    inputs = tune.choice(list(sweep.inputs)) if len(sweep.inputs) > 1 else sweep.inputs[0]
    space = {"lr": lr, "unfrozen_depth": depth, "inputs": inputs}
    for name in SEARCHED_LOSS:
        values = list(getattr(sweep, name))
        space[name] = tune.choice(values) if len(values) > 1 else values[0]
    return space


def plan_resources(sweep: SweepConfig, c: "cluster.Cluster") -> tuple[dict, int]:
    """Per-worker resources and how many trials run at once; refuses a sweep no trial of which can ever fit.

    The concurrency is what the cluster holds once the autoscaler has added every node it may (the nodes
    up now when no autoscaler config is readable), never more than the trials. When an autoscaler this
    process cannot see will add nodes (--wait-for-autoscaler), every trial may be started: each one's
    workers are one placement group, which is granted whole or waits, so waiting trials hold nothing.
    """
    per_worker = cluster.choose_resources(c, sweep.gpus_per_worker, sweep.cpus_per_worker,
                                          wait=sweep.wait_for_autoscaler)
    cluster.check_feasible(c, per_worker, sweep.workers_per_trial, what="one trial",
                           wait=sweep.wait_for_autoscaler)
    if c.types is None and sweep.wait_for_autoscaler:
        return per_worker, sweep.num_samples
    most = cluster.capacity_max(c, per_worker) // sweep.workers_per_trial
    return per_worker, max(1, min(sweep.num_samples, most))


def search_algorithm(sweep: SweepConfig, concurrent: int):
    """Random search that never has more than ``concurrent`` trials live.

    Tune's ``max_concurrent_trials`` is ignored when a search algorithm is passed (it warns and runs them
    all), and ``ConcurrencyLimiter`` wraps only a ``Searcher``: the random-search generator enforces the
    limit itself.
    """
    from ray.tune.search.basic_variant import BasicVariantGenerator
    return BasicVariantGenerator(random_state=sweep.search_seed, max_concurrent=concurrent)


def _trial(config: dict) -> None:
    """One Tune trial: a Ray Train run of the shared worker loop, its metrics forwarded to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mlc.distributed.train import build_trainer

    base = dict(config["base"])
    cfg = TrainConfig.from_dict({**base, "lr": config["lr"], "unfrozen_depth": config["unfrozen_depth"],
                                 "inputs": config.get("inputs", base.get("inputs", "auto")),
                                 **{k: config[k] for k in SEARCHED_LOSS if k in config}})
    trial = ray.tune.get_context().get_trial_id()  # stable across a sweep's restore
    sweep_url = config["sweep_url"]
    run_url = storage.join(sweep_url, trial)
    cfg = cfg.replace(output=run_url)
    # keep_checkpoints=1: the best epoch by validation F1, and Ray Train always keeps the latest besides,
    # which an interrupted trial resumes from.
    build_trainer(cfg, run_url, name=trial, storage_root=sweep_url, per_worker=config["per_worker"],
                  num_workers=config["workers"], max_failures=config["max_failures"], keep_checkpoints=1,
                  driver_host=config["driver_host"], callbacks=[TuneReportCallback()],
                  # the sweep's trials side by side: tensorboard --logdir <sweep>/tensorboard
                  tensorboard_url=storage.join(sweep_url, "tensorboard", trial)).fit()


def run_sweep(base: TrainConfig, sweep: SweepConfig, *, fresh: bool = False, log=print, progress: bool = True,
              predict_workers: int | None = None) -> dict:
    import ray

    from mlc.distributed.train import absolute_output, check_shared_output
    from mlc.model.backbones import check_model

    check_model(base.model)  # an unknown name, or timm not installed: before Ray starts
    t_start = time.perf_counter()
    from mlc.distributed.cluster import ensure_ray
    ensure_ray(log)  # the cluster in RAY_ADDRESS (as under `ray job submit`), else a new local Ray
    given = base  # as the caller gave it: data=None (the demo set) stays None in config.json
    base = with_demo_data(base, log)
    base = base.replace(epochs=sweep.max_epochs)
    output = absolute_output(base.output)
    sweep_url = storage.join(output, sweep.name)
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    check_shared_output(sweep_url, hosts | {ray.util.get_node_ip_address()})
    storage.check_writable(sweep_url)
    from mlc.data.store import Keep
    # Keep: trials that run one after another on this node share one decode-once store, removed at the end.
    with hold(sweep_url, what=f"sweep {sweep.name}", log=log), Keep():
        return _sweep_held(base, given, sweep, output, sweep_url, fresh=fresh, log=log, progress=progress,
                           predict_workers=predict_workers, t_start=t_start)


def _sweep_held(base: TrainConfig, given: TrainConfig, sweep: SweepConfig, output: str, sweep_url: str, *,
                fresh: bool, log, progress: bool, predict_workers: int | None, t_start: float) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from mlc.distributed.train import plan_workers
    from mlc.io.lock import LOCK_NAME
    from mlc.train.driver import replace
    from mlc.model.resnet import check_weights_found
    from mlc.data.run_data import prepare_data
    from mlc.io.config_json import write_config
    # Unreadable tables, and inputs the tables cannot serve, fail here, before any trial starts.
    data = prepare_data(base.replace(inputs=sweep.inputs[0]), log)
    for other in sorted(set(sweep.inputs[1:]) - {sweep.inputs[0]}):
        prepare_data(base.replace(inputs=other), lambda *_: None)
    check_weights_found(base.weights)
    per_worker, c = plan_workers(sweep.gpus_per_worker, sweep.cpus_per_worker, sweep.workers_per_trial,
                                 what=f"sweep {sweep.name}", wait=sweep.wait_for_autoscaler,
                                 timeout_s=sweep.wait_timeout, log=log)
    per_worker, concurrent = plan_resources(sweep, c)
    if fresh:  # every check has passed: only now is the previous sweep replaced
        replace(sweep_url, [n for n in storage.listdir(sweep_url) if n != LOCK_NAME], log)
    log(f"sweep {sweep.name}: {sweep.num_samples} trials of {sweep.workers_per_trial} worker(s) x "
        f"{cluster.fmt_resources(per_worker)}, at most {concurrent} at a time, global batch {base.batch_size}, "
        f"up to {sweep.max_epochs} epochs, ASHA grace {sweep.grace_epochs} epoch(s); "
        f"lr {sweep.lr_min:g}..{sweep.lr_max:g} (log-uniform), depth {list(sweep.depths)}, inputs {list(sweep.inputs)}, "
        f"loss {list(sweep.loss)}, asl gamma- {list(sweep.asl_gamma_neg)}, pos_weight {list(sweep.pos_weight)}")

    # The trial driver only waits on its Ray Train run, whose workers hold the CPUs/GPUs. Tune refuses an
    # empty request, so the driver asks for one byte of memory: no CPU is held by a waiting driver.
    trainable = tune.with_resources(_trial, {"memory": 1})
    storage_path, fs = ray_storage(output)
    experiment = f"{storage_path}/{sweep.name}"
    resuming = tune.Tuner.can_restore(experiment, storage_filesystem=fs)
    if resuming:  # a resumed sweep rewrites config.json once it has succeeded (below)
        log(f"resuming sweep {sweep.name} from {sweep_url}: finished trials are kept, unfinished ones continue")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, storage_filesystem=fs,
                                   resume_unfinished=True, resume_errored=True)
    else:
        write_config(sweep_url, "tune", train=given.replace(output=output), sweep=sweep)
        tuner = tune.Tuner(
            trainable,
            param_space={**search_space(sweep), "base": base.to_dict(), "sweep_url": sweep_url,
                         "per_worker": per_worker, "workers": sweep.workers_per_trial,
                         "max_failures": sweep.max_failures, "driver_host": ray.util.get_node_ip_address()},
            tune_config=tune.TuneConfig(
                num_samples=sweep.num_samples, search_alg=search_algorithm(sweep, concurrent),
                scheduler=ASHAScheduler(metric=METRIC, mode="max", time_attr="epoch", max_t=sweep.max_epochs,
                                        grace_period=sweep.grace_epochs, reduction_factor=sweep.reduction_factor)),
            run_config=tune.RunConfig(name=sweep.name, storage_path=storage_path, storage_filesystem=fs,
                                      verbose=1 if progress else 0),
        )
    grid = tuner.fit()
    out = summarize(grid, base, sweep, sweep_url, data, t_start, log=log, progress=progress,
                    predict_workers=predict_workers, gpus_per_worker=per_worker.get("GPU", 0.0))
    if resuming:
        write_config(sweep_url, "tune", train=given.replace(output=output), sweep=sweep)
    return out


def trial_id(r) -> str:
    return (r.metrics or {}).get("trial_id") or r.path.rstrip("/").split("_")[-1]


def kept_by_trial(grid, sweep_url: str) -> dict:
    """For each trial, the checkpoints Ray Train kept in its run folder: ``[(epoch, metrics), ...]``."""
    out = {}
    for r in grid:
        t = trial_id(r)
        try:
            out[t] = kept_checkpoints(storage.join(sweep_url, t))
        except (RuntimeError, FileNotFoundError, OSError):
            out[t] = []  # the trial failed before its first checkpoint (no snapshot)
    return out


def results_table(grid, sweep: SweepConfig, kept: dict) -> pd.DataFrame:
    """One row per trial; its best epoch is the best of the checkpoints Ray Train kept for it."""
    rows = []
    for r in grid:
        t = trial_id(r)
        df = r.metrics_dataframe
        epochs = df[df[METRIC].notna()] if df is not None and METRIC in df else pd.DataFrame()
        ran = int(epochs["epoch"].max()) if len(epochs) else 0
        try:
            best_epoch, best = best_of(kept.get(t, []))
        except LookupError:
            best_epoch, best = 0, None
        status = "error" if r.error else ("completed" if ran >= sweep.max_epochs else "stopped early")
        rows.append({
            "trial": t, "lr": r.config["lr"], "unfrozen_depth": r.config["unfrozen_depth"],
            "inputs": r.config.get("inputs", "auto"), **{k: r.config.get(k, "") for k in SEARCHED_LOSS},
            "best_f1_samples": float(best[SCORE]) if best is not None else math.nan,
            "best_map": float(best.get("map", math.nan)) if best is not None else math.nan,
            "best_epoch": best_epoch,
            "threshold_strategy": best.get("threshold_strategy", "") if best is not None else "",
            "threshold_value": best.get("threshold_value", math.nan) if best is not None else math.nan,
            "epochs_run": ran, "status": status, "error": str(r.error).splitlines()[0] if r.error else "",
        })
    return pd.DataFrame(rows).sort_values(["best_f1_samples", "trial"], ascending=[False, True],
                                          na_position="last").reset_index(drop=True)


def summarize(grid, base: TrainConfig, sweep: SweepConfig, sweep_url: str, data, t_start: float, *, log=print,
              progress: bool = True, predict_workers: int | None = None, gpus_per_worker: float | None = None) -> dict:
    from mlc.eval import plots

    table = results_table(grid, sweep, kept_by_trial(grid, sweep_url))
    buf = io.StringIO()
    table.to_csv(buf, index=False)
    storage.write_text(storage.join(sweep_url, "results.csv"), buf.getvalue())
    log("\n" + table.drop(columns=["error"]).to_string(index=False))
    ok = table[table.best_f1_samples.notna()]
    if ok.empty:
        raise RuntimeError(f"no trial of sweep {sweep.name} kept a checkpoint; see {sweep_url}/results.csv")
    top = ok.iloc[0]
    trial_url = storage.join(sweep_url, top.trial)
    publish_best(trial_url, int(top.best_epoch), storage.join(sweep_url, "best"))
    meta = json.loads(storage.read_bytes(storage.join(sweep_url, "best", "meta.json")))
    best = {"trial": top.trial, "lr": float(top.lr), "unfrozen_depth": int(top.unfrozen_depth),
            "inputs": TrainConfig.from_dict(meta["config"]).inputs,
            "epoch": int(top.best_epoch), "f1_samples": float(top.best_f1_samples), "map": float(top.best_map),
            "threshold": meta["threshold"], "checkpoint": storage.join(sweep_url, "best"),
            "config": meta["config"]}
    storage.write_text(storage.join(sweep_url, "best_config.json"), json.dumps(best, indent=1, default=float))
    storage.write_bytes(storage.join(sweep_url, "plots", "sweep.png"), plots.sweep_png(table))

    from mlc.distributed.predict import predict
    workers = predict_workers if predict_workers is not None else sweep.workers_per_trial
    # Prediction's batch is per actor: twice a training worker's share of the global batch.
    per_actor = max(1, 2 * -(-base.batch_size // sweep.workers_per_trial))
    pred = predict(storage.join(sweep_url, "best"), base.data, sweep_url,
                   ids_csv=base.test_csv, images=base.images, batch_size=per_actor,
                   num_workers=max(1, workers), gpus_per_worker=gpus_per_worker, log=log, progress=progress)
    log(f"best trial {top.trial}: lr {top.lr:.3g}, depth {int(top.unfrozen_depth)}, epoch {int(top.best_epoch)}, "
        f"validation F1 {top.best_f1_samples:.4f}, threshold {meta['threshold']['strategy']}; "
        f"wrote results.csv, best_config.json, best/, plots/sweep.png, predictions.csv under {sweep_url} "
        f"in {time.perf_counter() - t_start:.0f} s")
    return {"best": best, "table": table, "predictions": pred}
