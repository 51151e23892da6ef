"""Local mode end to end on a few dozen real COMP5329 images: outputs, resume, bad images, non-finite loss."""

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

from mlc.train import driver as trainer, engine, loop
from mlc.model.checkpoint import load_state
from mlc.config import TrainConfig
from mlc.model.checkpoint import ConfigMismatch
from mlc.data.run_data import TooManyBadImages
from mlc.data.table import read_table

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "comp5329"
pytestmark = pytest.mark.skipif(not (REAL / "images").is_dir(), reason=f"real data not found at {REAL}")


def make_dataset(root: Path, n_train=36, n_test=8) -> Path:
    """A small dataset in the real layout: the first rows of the real tables, their real images."""
    train = read_table(REAL / "train.csv").head(n_train)
    test = read_table(REAL / "test.csv").head(n_test)
    (root / "data").mkdir(parents=True)
    for i in list(train.ImageID) + list(test.ImageID):
        shutil.copy(REAL / "images" / i, root / "data" / i)
    with open(root / "train.csv", "w") as f:
        f.write("ImageID,Labels,Caption\n")
        for r in train.itertuples():
            f.write(f'{r.ImageID},{" ".join(r.Labels)},"{r.Caption}"\n')
    with open(root / "test.csv", "w") as f:
        f.write("ImageID,Caption\n")
        for r in test.itertuples():
            f.write(f'{r.ImageID},"{r.Caption}"\n')
    return root


def cfg_for(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), output=str(out), weights="none", image_size=32, epochs=2, batch_size=8,
                unfrozen_depth=1, dropout=0.0, loader_workers=0, val_fraction=0.25, lr=1e-3, amp="off",
                inputs="image")  # the image pipeline; tests/test_captions.py covers the caption networks
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds"))


def test_local_run_writes_every_output(dataset, tmp_path):
    out = tmp_path / "run"
    logs = []
    summary = trainer.fit(cfg_for(dataset, out), log=logs.append, progress=False)

    for rel in ["checkpoint/state.pt", "best/model.pt", "best/labels.json", "best/meta.json", "metrics.json",
                "predictions.csv", "probabilities.csv", "best/val_predictions.csv",
                "plots/history.png", "plots/per_class_f1.png", "plots/threshold.png", "plots/pr_curves.png",
                "report.html"]:
        assert (out / rel).is_file(), rel
    for png in (out / "plots").iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] is True
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["threshold"]["strategy"] in ("percentile", "global", "global_top1", "per_class")
    assert metrics["skipped_images"] == 0
    assert 0 <= metrics["best"]["f1_samples"] <= 1 and "baseline_f1_samples" in metrics

    labels = json.loads((out / "best" / "labels.json").read_text())["labels"]
    train = read_table(dataset / "train.csv")
    assert labels == sorted({x for ls in train.Labels for x in ls}, key=int)

    # The best model is plain torchvision.
    plain = torchvision.models.resnet50(num_classes=len(labels))
    plain.load_state_dict(torch.load(out / "best" / "model.pt", weights_only=True))

    # Predictions: Kaggle format, one row per test ImageID in test.csv order, original label strings.
    pred = read_table(out / "predictions.csv")
    test = read_table(dataset / "test.csv")
    assert list(pred.columns) == ["ImageID", "Labels"]
    assert pred.ImageID.tolist() == test.ImageID.tolist()
    assert all(set(ls) <= set(labels) for ls in pred.Labels)
    probs = pd.read_csv(out / "probabilities.csv")
    assert list(probs.columns) == ["ImageID"] + labels and len(probs) == len(test)
    assert probs[labels].to_numpy().min() >= 0 and probs[labels].to_numpy().max() <= 1
    assert any("baseline" in line for line in logs)
    assert summary["test"]["rows"] == len(test)


def test_predict_job_reproduces_the_runs_predictions(dataset, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "run"
    trainer.fit(cfg_for(dataset, out, epochs=1), log=lambda *_: None, progress=False)
    again = tmp_path / "again"
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "jobs/predict.py", "--checkpoint", str(out), "--output", str(again),
                        "--loader-workers", "0", "--quiet"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (again / "predictions.csv").read_text() == (out / "predictions.csv").read_text()
    assert "mlc report: prediction" in (again / "report.html").read_text()  # jobs/predict.py writes its report
    a = pd.read_csv(again / "probabilities.csv").drop(columns="ImageID").to_numpy()
    b = pd.read_csv(out / "probabilities.csv").drop(columns="ImageID").to_numpy()
    assert np.allclose(a, b, atol=1e-5)

    # --ids: any CSV with an ImageID column; rows come back in its order.
    ids = read_table(dataset / "test.csv").ImageID.tolist()[::-1][:3]
    (tmp_path / "ids.csv").write_text("Note,ImageID\n" + "".join(f"n{i},{x}\n" for i, x in enumerate(ids)))
    r = subprocess.run([sys.executable, "jobs/predict.py", "--checkpoint", str(out / "checkpoint"), "--output",
                        str(tmp_path / "subset"), "--ids", str(tmp_path / "ids.csv"), "--loader-workers", "0",
                        "--quiet"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert read_table(tmp_path / "subset" / "predictions.csv").ImageID.tolist() == ids


def test_interrupted_run_resumes_at_the_next_epoch_and_matches_an_uninterrupted_one(dataset, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    trainer.fit(cfg_for(dataset, straight, epochs=3), log=lambda *_: None, progress=False)

    real_epoch = engine.train_one_epoch

    def crash_on_epoch_3(*a, **k):
        if k["epoch"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_epoch(*a, **k)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(loop, "train_one_epoch", crash_on_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(cfg_for(dataset, resumed, epochs=3), log=lambda *_: None, progress=False)
    assert load_state(str(resumed / "checkpoint"))["epoch"] == 2
    assert not (resumed / "predictions.csv").exists()
    assert json.loads((resumed / "metrics.json").read_text())["complete"] is False

    monkeypatch.setattr(loop, "train_one_epoch", real_epoch)
    logs = []
    trainer.fit(cfg_for(dataset, resumed, epochs=3), log=logs.append, progress=False)
    assert any("training continues at epoch 3 of 3" in line for line in logs), logs

    a = load_state(str(straight / "checkpoint"))
    b = load_state(str(resumed / "checkpoint"))
    assert [e["epoch"] for e in b["history"]] == [1, 2, 3]
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k]["exp_avg"], sb[k]["exp_avg"], atol=1e-6)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


def test_resume_refuses_changed_settings_and_fresh_starts_over(dataset, tmp_path):
    out = tmp_path / "run"
    trainer.fit(cfg_for(dataset, out, epochs=1), log=lambda *_: None, progress=False)
    with pytest.raises(ConfigMismatch, match="lr"):
        trainer.fit(cfg_for(dataset, out, epochs=1, lr=0.05), log=lambda *_: None, progress=False)
    logs = []
    trainer.fit(cfg_for(dataset, out, epochs=1, lr=0.05), fresh=True, log=logs.append, progress=False)
    assert not any("resuming" in line for line in logs)
    assert load_state(str(out / "checkpoint"))["config"]["lr"] == 0.05


def _bad_image_dataset(root: Path) -> dict:
    make_dataset(root, n_train=24, n_test=6)
    train = read_table(root / "train.csv")
    test = read_table(root / "test.csv")
    d = root / "data"
    ids = train.ImageID.tolist()
    good = (d / ids[0]).read_bytes()
    (d / ids[1]).write_bytes(b"\x00\x01garbage" * 50)                                 # corrupt
    (d / ids[2]).write_bytes(good[: len(good) // 2])                                  # truncated
    Image.open(io.BytesIO(good)).convert("CMYK").save(d / ids[3], format="JPEG")      # CMYK
    Image.open(io.BytesIO(good)).convert("L").save(d / ids[4], format="PNG")          # grayscale PNG named .jpg
    os.remove(d / ids[5])                                                              # missing
    os.remove(d / test.ImageID[2])                                                     # missing at prediction
    return {"bad": {ids[1], ids[2], ids[5]}, "fine": {ids[3], ids[4]}, "test_missing": test.ImageID[2]}


def test_bad_images_are_skipped_named_counted_and_limited(tmp_path):
    root = tmp_path / "ds"
    info = _bad_image_dataset(root)
    out = tmp_path / "run"
    logs = []
    trainer.fit(cfg_for(root, out, epochs=1, max_bad_fraction=0.5), log=logs.append, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {Path(k).name for k in metrics["skipped"]} == info["bad"]
    assert metrics["skipped_images"] == 3
    warned = " ".join(logs)
    for name in info["bad"] | {info["test_missing"]}:
        assert name in warned
    pred = read_table(out / "predictions.csv")
    row = pred.set_index("ImageID").Labels[info["test_missing"]]
    assert row == []  # the unreadable test image keeps its row, with no labels
    probs = pd.read_csv(out / "probabilities.csv").set_index("ImageID")
    assert probs.loc[info["test_missing"]].isna().all()
    assert len(pred) == 6

    with pytest.raises(TooManyBadImages, match="max-bad-fraction"):
        trainer.fit(cfg_for(root, tmp_path / "strict", epochs=1), log=lambda *_: None, progress=False)


@pytest.mark.parametrize("store", ["off", "auto"])
def test_non_finite_loss_stops_without_a_checkpoint(dataset, tmp_path, monkeypatch, store):
    import mlc.data.batch as batch
    import mlc.data.run_data as run_data
    if store == "off":  # NaN images from the CPU transform
        real = run_data.train_transform

        def poisoned(size):
            t = real(size)
            t.pipeline = (lambda f: lambda img: f(img) * float("nan"))(t.pipeline)
            return t
        monkeypatch.setattr(run_data, "train_transform", poisoned)
    else:  # NaN images from the device crop of stored slots
        real_crop = batch.crop_batch
        monkeypatch.setattr(batch, "crop_batch", lambda *a, **k: real_crop(*a, **k) * float("nan"))
    out = tmp_path / "run"
    with pytest.raises(engine.NonFiniteLossError, match="epoch 1"):
        trainer.fit(cfg_for(dataset, out, store=store), log=lambda *_: None, progress=False)
    assert not (out / "checkpoint" / "state.pt").exists()
    assert not (out / "best").exists()


def test_the_image_store_is_chosen_said_and_removed(dataset, tmp_path, monkeypatch):
    """--store auto: in memory when it fits the budget, on local disk when it does not, streaming when neither
    holds it; the log says which and why, and no store is left behind after the run."""
    from mlc.data import store_choice
    mem, disk = tmp_path / "store-mem", tmp_path / "store-disk"
    monkeypatch.setenv("MLC_STORE_MEMORY_DIR", str(mem))
    monkeypatch.setenv("MLC_STORE_DIR", str(disk))
    said = {}
    for name, kw in (("memory", {}), ("disk", {"store_budget": 0.0})):
        logs = []
        trainer.fit(cfg_for(dataset, tmp_path / name, epochs=1, **kw), log=logs.append, progress=False)
        said[name] = [line for line in logs if line.startswith("image store:")]
    assert len(said["memory"]) == 1 and "in memory" in said["memory"][0] and "first epoch only" in said["memory"][0]
    assert "raw, in local disk" in said["disk"][0] and "memory: 0 MiB holds neither" in said["disk"][0]
    monkeypatch.setattr(store_choice, "free_bytes", lambda root: 0)
    logs = []
    trainer.fit(cfg_for(dataset, tmp_path / "stream", epochs=1, store_budget=0.0), log=logs.append, progress=False)
    assert any("do not fit" in line and "streaming" in line for line in logs)
    for root in (mem, disk):
        assert not root.exists() or [n for n in os.listdir(root) if not n.startswith(".")] == []
