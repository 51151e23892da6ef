"""Batch prediction on Ray Data actors: input order, equality with in-process scores, bad images, the job."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mlc.model.checkpoint import save_model
from mlc.config import TrainConfig
from mlc.data.labels import LabelVocab
from mlc.eval.thresholds import ThresholdChoice
from mlc.model.resnet import bare_state_dict, build_model
from mlc.prediction.checkpoints import predict_from_checkpoint
from mlc.data.table import read_table

# Ray 2.60 reads RAY_AUTH_MODE once, when ray is first imported (conftest sets it too, before any test module).
os.environ.setdefault("RAY_AUTH_MODE", "token")

REPO = Path(__file__).resolve().parents[1]
LABELS = ["1", "3", "7", "19"]


@pytest.fixture(scope="module")
def setup(real_data, tmp_path_factory):
    """A dataset whose images sit in imgs/ (not the default data/), a shuffled test.csv holding one missing
    and one corrupt image, a tiny checkpoint trained "on" it, and the in-process predictions."""
    if not (real_data / "images").is_dir():
        pytest.skip(f"no images in {real_data}")
    root = tmp_path_factory.mktemp("ds")
    (root / "imgs").mkdir()
    names = sorted(os.listdir(real_data / "images"), key=lambda s: int(s.split(".")[0]))[:10]
    for name in names:
        shutil.copy(real_data / "images" / name, root / "imgs" / name)
    (root / "imgs" / names[3]).write_bytes(b"\x00\x01garbage" * 50)  # corrupt
    bad = {names[3], "999999.jpg"}                                   # corrupt, missing
    ids = names + ["999999.jpg"]
    random.Random(1).shuffle(ids)
    (root / "test.csv").write_text("ImageID,Caption\n" + "".join(f'{i},"a caption"\n' for i in ids))

    torch.manual_seed(0)
    model = build_model(len(LABELS), unfrozen_depth=1, dropout=0.0, weights="none")
    with torch.no_grad():
        model.fc.weight.mul_(0.01)  # keep a random network's scores away from 0 and 1
    cfg = TrainConfig(data=str(root), images="imgs", output=str(root / "run"), weights="none", image_size=32,
                      unfrozen_depth=1, dropout=0.0, amp="off", loader_workers=0)
    ckpt = root / "run" / "best"
    save_model(str(ckpt), bare_state_dict(model), LabelVocab(LABELS),
               {"config": cfg.to_dict(), "threshold": ThresholdChoice("percentile", 50.0).to_dict(), "epoch": 1})

    local = root / "local"
    logs = []
    summary = predict_from_checkpoint(str(root / "run"), None, str(local), batch_size=4, num_workers=0,
                                      loader_workers=0, log=logs.append, progress=False)
    return {"root": root, "ckpt": ckpt, "ids": ids, "bad": bad, "local": local, "local_summary": summary,
            "local_logs": logs}


def _check_outputs(out: Path, setup) -> pd.DataFrame:
    ids, bad = setup["ids"], setup["bad"]
    pred = read_table(out / "predictions.csv")
    assert list(pred.columns) == ["ImageID", "Labels"]
    assert pred.ImageID.tolist() == ids  # input order, one row each
    probs = pd.read_csv(out / "probabilities.csv")
    assert list(probs.columns) == ["ImageID"] + LABELS
    assert probs.ImageID.tolist() == ids
    by_id = pred.set_index("ImageID").Labels
    for i in ids:
        if i in bad:
            assert by_id[i] == [], i
        else:
            assert by_id[i] and set(by_id[i]) <= set(LABELS), i  # percentile 50 keeps the top half
    values = probs.set_index("ImageID")[LABELS]
    assert values.loc[sorted(bad)].isna().all().all()
    assert values.drop(index=sorted(bad)).notna().all().all()
    return probs


def test_in_process_prediction_uses_the_checkpoints_image_folder(setup):
    # The checkpoint was trained with images in imgs/, not <data>/data: only the two bad images fail.
    assert set(setup["local_summary"]["unreadable"]) == setup["bad"]
    _check_outputs(setup["local"], setup)


def predict_on_cluster(address: str, ckpt: str, ids: list, images: str, out: str) -> tuple:
    """predict_distributed in an isolated process (see ray_head.isolated); returns (summary, log lines).

    With the GPU layout forced (split=True): CPU tasks decode ahead of the model actors. The job test below
    runs the CPU layout (each actor decodes its own rows)."""
    import ray as ray_
    from mlc.distributed.predict import predict_distributed
    logs = []
    ray_.init(address=address, log_to_driver=False)
    try:
        summary = predict_distributed(ckpt, ids, images, out, num_workers=2, batch_size=3, log=logs.append,
                                      progress=False, split=True)
    finally:
        ray_.shutdown()
    return summary, logs


def test_two_ray_workers_write_the_in_process_predictions_in_input_order(setup, ray_head, tmp_path):
    from ray_head import isolated
    out = tmp_path / "dist"
    summary, logs = isolated(predict_on_cluster, ray_head.address, str(setup["ckpt"]), list(setup["ids"]),
                             str(setup["root"] / "imgs"), str(out))
    probs = _check_outputs(out, setup)
    local = pd.read_csv(setup["local"] / "probabilities.csv")
    np.testing.assert_allclose(probs[LABELS].to_numpy(), local[LABELS].to_numpy(), atol=1e-5)
    assert (out / "predictions.csv").read_text() == (setup["local"] / "predictions.csv").read_text()

    assert summary["rows"] == len(setup["ids"]) and set(summary["unreadable"]) == setup["bad"]
    assert sum(summary["workers"].values()) == len(setup["ids"]) and 1 <= len(summary["workers"]) <= 2
    text = "\n".join(logs)
    for name in setup["bad"]:
        assert f"cannot read {setup['root'] / 'imgs' / name}" in text, text
    assert "on 2 Ray workers" in text and "img/s" in text and "decoding in CPU tasks ahead of them" in text


def test_predict_job_with_num_workers_runs_on_the_cluster(setup, ray_head, tmp_path):
    out = tmp_path / "job"
    env = dict(os.environ, RAY_ADDRESS=ray_head.address, RAY_AUTH_MODE="token")
    r = subprocess.run([sys.executable, "jobs/predict.py", "--checkpoint", str(setup["root"] / "run"),
                        "--output", str(out), "--num-workers", "2", "--batch-size", "3", "--quiet"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"joined the cluster at {ray_head.address}" in r.stdout, r.stdout
    assert "on 2 Ray workers" in r.stdout and "img/s" in r.stdout
    for name in setup["bad"]:
        assert name in r.stdout
    probs = _check_outputs(out, setup)
    local = pd.read_csv(setup["local"] / "probabilities.csv")
    np.testing.assert_allclose(probs[LABELS].to_numpy(), local[LABELS].to_numpy(), atol=1e-5)


def test_flip_on_ray_workers_is_the_in_process_flip(setup, ray_head, tmp_path):
    """--tta flip on the job's Ray Data workers scores as the in-process flip does, and not as the plain model."""
    flip = tmp_path / "flip"
    predict_from_checkpoint(str(setup["root"] / "run"), None, str(flip), batch_size=4, num_workers=0,
                            loader_workers=0, tta="flip", log=lambda *_: None, progress=False)
    out = tmp_path / "job"
    env = dict(os.environ, RAY_ADDRESS=ray_head.address, RAY_AUTH_MODE="token")
    r = subprocess.run([sys.executable, "jobs/predict.py", "--checkpoint", str(setup["root"] / "run"),
                        "--output", str(out), "--num-workers", "2", "--batch-size", "3", "--tta", "flip", "--quiet"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    probs = _check_outputs(out, setup)[LABELS].to_numpy()
    np.testing.assert_allclose(probs, pd.read_csv(flip / "probabilities.csv")[LABELS].to_numpy(), atol=1e-5)
    plain = pd.read_csv(setup["local"] / "probabilities.csv")[LABELS].to_numpy()
    assert np.nanmax(np.abs(probs - plain)) > 1e-4
    assert json.loads((out / "predict_config.json").read_text())["predict"]["tta"] == "flip"
