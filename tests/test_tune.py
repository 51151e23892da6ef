"""The Ray Tune sweep: a 3-trial sweep on tiny real data, interrupted and resumed, with every output checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from mlc.tune import SweepConfig, plan_resources
from test_trainer import REAL, make_dataset

pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[1]


def test_a_sweep_no_trial_of_which_fits_fails_before_it_starts():
    with pytest.raises(ValueError, match="needs 2 GPU.*has 0"):
        plan_resources(SweepConfig(workers_per_trial=2, gpus_per_worker=1), {"CPU": 8})
    with pytest.raises(ValueError, match="needs 6 CPU"):
        plan_resources(SweepConfig(workers_per_trial=3, cpus_per_worker=2), {"CPU": 4})
    # An autoscaler may add the nodes: then the trials wait instead.
    plan_resources(SweepConfig(workers_per_trial=2, gpus_per_worker=1, wait_for_autoscaler=True), {"CPU": 8})
    # Concurrency is what the cluster holds, never more than the trials.
    assert plan_resources(SweepConfig(num_samples=8, workers_per_trial=2), {"CPU": 5})[1] == 2
    assert plan_resources(SweepConfig(num_samples=2), {"CPU": 16})[1] == 2
    per_worker, n = plan_resources(SweepConfig(num_samples=8), {"CPU": 16, "GPU": 4})
    assert per_worker == {"CPU": 1.0, "GPU": 1.0} and n == 4


def test_sweep_config_is_validated():
    for bad, msg in [({"depths": (5,)}, "--depths"), ({"lr_min": 0.0}, "--lr-min"), ({"num_samples": 0}, "--num-samples"),
                     ({"grace_epochs": 3, "max_epochs": 2}, "--grace-epochs")]:
        with pytest.raises(ValueError, match=msg):
            SweepConfig(**bad)


@pytest.mark.skipif(not (REAL / "images").is_dir(), reason=f"real data not found at {REAL}")
def test_sweep_interrupted_and_rerun_completes_with_every_output(tmp_path, ray_head):
    data = make_dataset(tmp_path / "ds")
    env = dict(os.environ, RAY_ADDRESS=ray_head.address, RAY_AUTH_MODE="token")
    cmd = [sys.executable, "jobs/tune.py", "--data", str(data), "--output", str(tmp_path / "sweeps"), "--name", "sw",
           "--num-samples", "3", "--max-epochs", "2", "--workers-per-trial", "1", "--depths", "0,1",
           "--weights", "none", "--image-size", "32", "--batch-size", "8", "--val-fraction", "0.25",
           "--loader-workers", "0", "--amp", "off", "--quiet"]
    sweep = tmp_path / "sweeps" / "sw"

    # Kill the sweep's driver once a trial has written its first checkpoint.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    try:
        while not list(sweep.glob("*/epoch_0001/meta.json")):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "no trial checkpoint after 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (sweep / "results.csv").exists()
    time.sleep(3)

    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "resuming sweep sw" in out

    table = pd.read_csv(sweep / "results.csv")
    assert len(table) == 3 and set(table.status) <= {"completed", "stopped early"}
    assert table.best_f1_samples.notna().all() and (table.epochs_run >= 1).all()
    assert set(table.unfrozen_depth) <= {0, 1} and ((table.lr >= 1e-4) & (table.lr <= 1e-2)).all()
    best = json.loads((sweep / "best_config.json").read_text())
    assert best["f1_samples"] == pytest.approx(table.best_f1_samples.max())
    assert best["threshold"]["strategy"] in ("percentile", "global", "per_class") and "value" in best["threshold"]
    assert (sweep / "plots" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((sweep / "best" / "meta.json").read_text())["config"]["lr"] == pytest.approx(best["lr"])

    pred = pd.read_csv(sweep / "predictions.csv")
    test_ids = pd.read_csv(data / "test.csv").ImageID.tolist()
    assert pred.ImageID.tolist() == test_ids and list(pred.columns) == ["ImageID", "Labels"]
    assert pd.read_csv(sweep / "probabilities.csv").ImageID.tolist() == test_ids

    # jobs/score.py on the best trial's validation predictions gives the F1 the sweep reported.
    val = pd.read_csv(sweep / "best" / "val_predictions.csv")
    from mlc.table import read_table
    train = read_table(str(data / "train.csv")).set_index("ImageID")
    truth = tmp_path / "val_truth.csv"
    truth.write_text("ImageID,Labels,Caption\n" + "".join(
        f'{i},{" ".join(train.Labels[i])},"x"\n' for i in val.ImageID))
    s = subprocess.run([sys.executable, "jobs/score.py", "--predictions", str(sweep / "best" / "val_predictions.csv"),
                        "--truth", str(truth), "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert s.returncode == 0, s.stderr
    scored = json.loads(s.stdout.strip().splitlines()[-1])
    assert scored["f1_samples"] == pytest.approx(best["f1_samples"], abs=1e-9)
