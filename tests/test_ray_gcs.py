"""A 2-worker Ray Train run whose data, checkpoints (Ray's own storage included) and outputs are on gs://."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mlc import storage
from mlc.checkpoint import load_model_checkpoint, load_training_state
from test_trainer import REAL, cfg_for, make_dataset

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(not (REAL / "images").is_dir(), reason=f"real data not found at {REAL}")


def test_two_worker_ray_run_reads_and_writes_the_bucket(gcs, ray_head, tmp_path):
    from ray_head import isolated
    from test_ray_train import run_distributed
    gcs.upload(make_dataset(tmp_path / "ds"), gcs.url("ds"))
    # The session's Ray head started before this server: its workers get the gcsfs settings from the job.
    isolated(run_distributed, ray_head.address, cfg_for(gcs.url("ds"), gcs.url("runs"), batch_size=4, epochs=2).to_dict(),
             {"num_workers": 2, "name": "g1", "max_failures": 0}, runtime_env={"env_vars": gcs.worker_env()})
    run = gcs.url("runs/g1")
    names = set(storage.listdir(run))
    # Ray Train's own files went through the same filesystem (gcsfs behind pyarrow's FSSpecHandler).
    assert {"checkpoint_manager_snapshot.json", "epoch_0001", "epoch_0002", "best", "plots"} <= names, names
    metrics = json.loads(storage.read_bytes(storage.join(run, "metrics.json")))
    assert metrics["complete"] is True and [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert load_training_state(storage.join(run, "epoch_0002"))["epoch"] == 2
    state, vocab, meta = load_model_checkpoint(run)
    assert meta["epoch"] == metrics["best_epoch"] and len(vocab) > 0
    import io
    pred = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(run, "predictions.csv"))))
    assert len(pred) == 8 and list(pred.columns) == ["ImageID", "Labels"]
