"""Settings and checkpoints written by earlier versions: each old shape upgraded by mlc.migrate.migrate, and a run
folder written by d96def2 (main when the training path was reworked) resumed, predicted from and replayed."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from mlc.config import TrainConfig
from mlc.migrate import migrate

FIXTURE = Path(__file__).parent / "fixtures" / "run_d96def2"
REPO = Path(__file__).resolve().parents[1]


def test_the_dataloader_setting_saved_under_its_old_name():
    assert migrate({"num_workers": 3})["loader_workers"] == 3 and "num_workers" not in migrate({"num_workers": 3})
    assert migrate({"num_workers": 3, "loader_workers": 1})["loader_workers"] == 1  # today's name wins


def test_compile_saved_as_a_switch():
    assert migrate({"compile": True})["compile"] == "on" and migrate({"compile": False})["compile"] == "off"
    assert migrate({"compile": "auto"})["compile"] == "auto"


def test_a_model_saved_before_inputs_existed_read_images():
    old = TrainConfig(data="/d").to_dict()
    old.pop("inputs")
    for saved in (old, {**old, "inputs": "auto"}):
        assert migrate({"model": {}, "config": saved, "labels": []})["config"]["inputs"] == "image"  # a state
        assert migrate({"config": saved, "threshold": None})["config"]["inputs"] == "image"  # a meta.json
        assert migrate(saved, resolved=True)["inputs"] == "image"
    # A config.json holds the settings as given: auto there is today's auto.
    assert migrate({"train": {**old, "inputs": "auto"}})["train"]["inputs"] == "auto"


def test_gpu_decode_is_dropped_with_a_notice_when_it_was_on():
    said = []
    assert "gpu_decode" not in migrate({"train": {"gpu_decode": True}}, where="runs/r1/config.json", log=said.append)["train"]
    assert said == ["notice: runs/r1/config.json: --gpu-decode was removed (the decode-once image store replaced "
                    "it); images are decoded on the CPUs once per node"]
    said.clear()
    assert "gpu_decode" not in migrate({"gpu_decode": False}, log=said.append) and said == []  # it changed nothing


def test_a_state_saved_before_its_newer_keys_gets_their_empty_values():
    state = migrate({"model": {}, "config": {"lr": 0.1}, "epoch": 1})
    assert state["tokenizer"] is None and state["scaler"] is None and state["bad_images"] == {}
    assert state["threshold"] is None and state["epoch"] == 1


def test_a_setting_this_version_does_not_have_is_named(monkeypatch):
    said = []
    monkeypatch.setattr("mlc.logs.say", said.append)
    assert TrainConfig.from_dict({"lr": 0.5, "from_the_future": 1}).lr == 0.5
    assert said and "from_the_future" in said[0]


@pytest.fixture
def old_run(tmp_path) -> Path:
    """A copy of the d96def2 folder: its tables (caption-only, no images), its run, its config.json."""
    root = tmp_path / "old"
    shutil.copytree(FIXTURE, root)
    return root


def test_a_checkpoint_of_d96def2_loads_predicts_and_resumes(old_run, tmp_path):
    import mlc
    from mlc.model.checkpoint import load_state
    from mlc.train.driver import fit
    state = load_state(str(old_run / "checkpoint"))
    assert state["epoch"] == 2 and "gpu_decode" not in state["config"] and state["config"]["inputs"] == "caption"
    pred = mlc.predict(str(old_run), output=str(tmp_path / "again"), data=str(old_run / "data"), progress=False,
                       log=lambda *_: None)
    assert pred["rows"] == 8
    assert (tmp_path / "again" / "predictions.csv").read_text() == (old_run / "predictions.csv").read_text()
    logs = []
    cfg = TrainConfig.from_dict({**state["config"], "data": str(old_run / "data"), "output": str(old_run),
                                 "epochs": 3})
    summary = fit(cfg, log=logs.append, progress=False)
    assert any("epoch 2 done, training continues at epoch 3 of 3" in line for line in logs), logs
    assert [e["epoch"] for e in load_state(str(old_run / "checkpoint"))["history"]] == [1, 2, 3]
    assert summary["best_epoch"] in (1, 2, 3)


def test_a_config_json_of_d96def2_replays(old_run):
    sys.path.insert(0, str(REPO / "jobs"))
    import train as train_job
    from mlc.cli import config_from_args
    p = train_job.get_args_parser()
    cfg = config_from_args(p.parse_args(["--config", str(old_run / "config.json"), "--data", str(old_run / "data")]))
    saved = json.loads((old_run / "config.json").read_text())["train"]
    assert cfg.inputs == "caption" and cfg.epochs == saved["epochs"] == 2 and cfg.lr == saved["lr"]
    assert cfg.data == str(old_run / "data")  # a flag given overrides the file
