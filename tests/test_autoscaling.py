"""The jobs on a scale-from-zero cluster: Ray's fake multi-node autoscaler with a 0-CPU head and no worker node
until work asks for one (tests/ray_head.py ``AutoscalingHead``).

One spawned child runs the cluster for both checks (a 2-worker training run, then a 3-trial sweep through
``jobs/tune.py`` exactly as documented, without --wait-for-autoscaler, its driver killed after the first
checkpoint and the command run again) and stops it, so the suite pays for one cluster and one sweep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ray_head import isolated
from test_trainer import REAL, cfg_for, make_dataset

pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(not (REAL / "images").is_dir(), reason=f"real data not found at {REAL}")
REPO = Path(__file__).resolve().parents[1]

# The cluster: head {"CPU": 0}, a worker type with 1 CPU, min_workers 0, max_workers 2.
WORKER_TYPES = {"cpu1": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}}


def _no_cuda(*_, **__):
    raise AssertionError("the Ray driver touched CUDA")


def on_a_scale_from_zero_cluster(dataset: str, out: str) -> dict:
    import ray
    import torch
    from ray_head import AutoscalingHead

    # Idle nodes go after 12 s, so the sweep below starts from zero worker nodes too.
    head = AutoscalingHead(WORKER_TYPES, idle_timeout_minutes=0.2)
    result = {}
    try:
        os.environ.update(RAY_ADDRESS=head.env["RAY_ADDRESS"], MLC_AUTOSCALER_CONFIG=head.config_path)
        # The driver must never probe a GPU (it may run on a GPU head node): any CUDA call fails here.
        torch.cuda.is_available = _no_cuda
        torch.cuda._lazy_init = _no_cuda
        ray.init(address=head.env["RAY_ADDRESS"], log_to_driver=False)
        result["nodes_at_start"] = sum(1 for n in ray.nodes() if n.get("Alive"))
        result["cpus_at_start"] = ray.cluster_resources().get("CPU", 0)
        from mlc.config import ScaleConfig, TrainConfig
        from mlc.distributed.train import fit_distributed
        logs = []
        t0 = time.time()
        cfg = cfg_for(Path(dataset), Path(out) / "train", epochs=1)
        fit_distributed(TrainConfig(**cfg.to_dict()), ScaleConfig(num_workers=2, name="r", max_failures=1,
                                                                  wait_timeout=300),
                        progress=False, log=logs.append)
        result["train_seconds"] = time.time() - t0
        result["train_log"] = logs
        deadline = time.time() + 180
        while sum(1 for n in ray.nodes() if n.get("Alive")) > 1 and time.time() < deadline:
            time.sleep(1)
        result["nodes_before_sweep"] = sum(1 for n in ray.nodes() if n.get("Alive"))
        ray.shutdown()

        # The sweep exactly as the README documents it: no --wait-for-autoscaler. A learning rate of 1e-8
        # leaves the model as it was, so every trial's two epochs tie on validation F1 (issue 11's crash).
        # Its driver is killed once a trial has a checkpoint, and the same command is run again.
        cmd = [sys.executable, "jobs/tune.py", "--data", dataset, "--output", str(Path(out) / "sweeps"),
               "--name", "sw", "--num-samples", "3", "--max-epochs", "2", "--workers-per-trial", "1",
               "--depths", "0", "--lr-min", "1e-8", "--lr-max", "1e-8", "--weights", "none",
               "--image-size", "32", "--batch-size", "8", "--val-fraction", "0.25", "--loader-workers", "0",
               "--amp", "off", "--quiet",
               # What the network reads is a searched choice too (the trials' runs carry the captions).
               "--inputs", "image,image+caption"]
        sweep = Path(out) / "sweeps" / "sw"
        t0 = time.time()
        with open(Path(out) / "sweep-killed.log", "w") as first:
            proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), stdout=first, stderr=subprocess.STDOUT)
            try:
                deadline = time.time() + 600
                while not list(sweep.glob("*/epoch_0001/meta.json")):
                    if proc.poll() is not None or time.time() > deadline:
                        raise AssertionError(f"no trial checkpoint (exit {proc.poll()}): "
                                             + (Path(out) / "sweep-killed.log").read_text()[-3000:])
                    time.sleep(0.2)
                proc.kill()
                proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
        result["killed_with_results"] = (sweep / "results.csv").exists()
        time.sleep(3)
        r = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=900)
        result["sweep_seconds"] = time.time() - t0
        (Path(out) / "sweep.log").write_text(r.stdout + r.stderr)
        result["sweep_rc"] = r.returncode
        return result
    finally:
        if ray.is_initialized():
            ray.shutdown()
        head.stop()


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("autoscaling")
    data = make_dataset(tmp / "ds")
    result = isolated(on_a_scale_from_zero_cluster, str(data), str(tmp / "out"), timeout=1500)
    return {"data": data, "out": tmp / "out", **result}


def test_training_starts_on_a_cluster_with_no_worker_node_and_waits_visibly(scaled):
    assert scaled["nodes_at_start"] == 1 and scaled["cpus_at_start"] == 0
    log = "\n".join(scaled["train_log"])
    assert "waiting for 2 nodes of type cpu1" in log, log
    assert "planned from the autoscaling config" in log and "up to 2" in log
    # The 8 test rows are one batch: one prediction actor, not a second one that would load the model for nothing.
    assert "predicting 8 images on 1 Ray worker (of 2 asked: 8 rows are 1 batch)" in log, log
    assert "scored 8 images on 1 of 1 Ray worker in" in log, log
    run = scaled["out"] / "train" / "r"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["complete"] is True and metrics["workers"] == 2
    # Recorded from the workers (the driver's CUDA was booby-trapped): their device and precision.
    assert metrics["device"] == "cpu" and metrics["amp"] == "fp32"
    assert len(pd.read_csv(run / "predictions.csv")) == 8


def test_the_documented_sweep_runs_from_zero_nodes_resumes_after_its_driver_dies_and_survives_ties(scaled):
    first = (scaled["out"] / "sweep-killed.log").read_text()
    out = (scaled["out"] / "sweep.log").read_text()
    assert scaled["sweep_rc"] == 0, out[-6000:]
    # It started with no worker node, planned 2 trials at a time from the node types (2 nodes of 1 CPU)
    # and waited for the first trial's node.
    assert scaled["nodes_before_sweep"] == 1
    assert "waiting for 1 node of type cpu1" in first, first[-3000:]
    assert "at most 2 at a time" in first and "will be ignored" not in first + out
    assert not scaled["killed_with_results"] and "resuming sweep sw" in out

    sweep = scaled["out"] / "sweeps" / "sw"
    table = pd.read_csv(sweep / "results.csv")
    assert len(table) == 3 and set(table.status) <= {"completed", "stopped early"}
    assert table.best_f1_samples.notna().all() and (table.epochs_run >= 1).all()
    assert (table.unfrozen_depth == 0).all() and ((table.lr - 1e-8).abs() < 1e-15).all()
    assert set(table.inputs) <= {"image", "image+caption"}
    for t in table.itertuples():  # each trial's network read what its row says
        meta = json.loads((sweep / t.trial / f"epoch_{t.best_epoch:04d}" / "meta.json").read_text())
        assert meta["config"]["inputs"] == t.inputs
    best = json.loads((sweep / "best_config.json").read_text())
    assert best["inputs"] == json.loads((sweep / "best" / "meta.json").read_text())["config"]["inputs"]
    assert best["f1_samples"] == pytest.approx(table.best_f1_samples.max())
    assert best["threshold"]["strategy"] in ("percentile", "global", "global_top1", "per_class") and "value" in best["threshold"]
    assert (sweep / "plots" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # best/ is a checkpoint Ray kept: its epoch folder still exists in the trial's run folder.
    assert (sweep / best["trial"] / f"epoch_{best['epoch']:04d}" / "model.pt").is_file()
    assert json.loads((sweep / "best" / "meta.json").read_text())["epoch"] == best["epoch"]
    # Every trial kept its latest checkpoint (to resume from) besides its best.
    for t in table.itertuples():
        assert (sweep / t.trial / f"epoch_{t.epochs_run:04d}" / "state.pt").is_file(), t
    test_ids = pd.read_csv(scaled["data"] / "test.csv").ImageID.tolist()
    pred = pd.read_csv(sweep / "predictions.csv")
    assert pred.ImageID.tolist() == test_ids and list(pred.columns) == ["ImageID", "Labels"]
    assert pd.read_csv(sweep / "probabilities.csv").ImageID.tolist() == test_ids

    # jobs/score.py on the best trial's validation predictions gives the F1 the sweep reported.
    from mlc.data.table import read_table
    val = pd.read_csv(sweep / "best" / "val_predictions.csv")
    train = read_table(str(scaled["data"] / "train.csv")).set_index("ImageID")
    truth = scaled["out"] / "val_truth.csv"
    truth.write_text("ImageID,Labels,Caption\n" + "".join(
        f'{i},{" ".join(train.Labels[i])},"x"\n' for i in val.ImageID))
    s = subprocess.run([sys.executable, "jobs/score.py", "--predictions", str(sweep / "best" / "val_predictions.csv"),
                        "--truth", str(truth), "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert s.returncode == 0, s.stderr
    assert json.loads(s.stdout.strip().splitlines()[-1])["f1_samples"] == pytest.approx(best["f1_samples"], abs=1e-9)


def test_the_pack_job_scales_a_cluster_up_from_zero_worker_nodes(tmp_path):
    """jobs/pack.py on a cluster with no worker node and a head with no CPU: its Ray Data tasks ask the
    autoscaler for nodes, and every shard is written there."""
    from mlc.data.demo import make_demo_dataset
    from ray_head import AutoscalingHead
    src = make_demo_dataset(str(tmp_path / "src"), n_train=96, n_test=24, image_size=40, seed=2)
    head = AutoscalingHead(WORKER_TYPES, idle_timeout_minutes=0.2)
    try:
        r = subprocess.run([sys.executable, "jobs/pack.py", "--data", str(src), "--output",
                            str(tmp_path / "pack"), "--image-size", "32", "--shard-mb", "0.02"], cwd=REPO, env=head.env,
                           capture_output=True, text=True, timeout=600)
    finally:
        head.stop()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    manifest = json.loads((tmp_path / "pack" / "manifest.json").read_text())
    shards = [s for t in manifest["tables"].values() for s in t["shards"]]
    assert len(shards) > 2 and sum(s["rows"] for s in shards) == 120
