"""config.json written by every run and read back by --config; flags given override it; one meaning per flag."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from mlc import cli
from mlc.io import config_json as replay
from mlc.config import ScaleConfig, SweepConfig, TrainConfig
from mlc.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))
import predict as predict_job  # noqa: E402
import train as train_job  # noqa: E402
import tune as tune_job  # noqa: E402


def test_config_json_round_trip_and_flags_override(tmp_path):
    cfg = TrainConfig(data="gs://b/comp5329", images="images", output="gs://b/runs", lr=3e-4, unfrozen_depth=2,
                      freeze_bn=True, loader_workers=3)
    scale = ScaleConfig(num_workers=(2, 4), gpus_per_worker=1.0, name="r1", max_failures=5)
    doc = replay.write_config(str(tmp_path), "train", local=False, train=cfg, scale=scale)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == json.loads(json.dumps(doc))
    assert saved["mlc_version"] and "git_commit" in saved and saved["train"]["weight_decay"] == 0.01  # defaults too

    p = train_job.get_args_parser()
    args = p.parse_args(["--config", str(tmp_path / "config.json")])
    assert cli.config_from_args(args) == cfg
    assert cli.scale_from_args(args) == scale
    assert cli.given_or_file(args, "local", True) is False
    args = p.parse_args(["--config", str(tmp_path / "config.json"), "--lr", "0.01", "--no-freeze-bn",
                         "--num-workers", "3", "--local"])
    assert cli.config_from_args(args) == cfg.replace(lr=0.01, freeze_bn=False)
    assert cli.scale_from_args(args) == dataclasses.replace(scale, num_workers=3)
    assert cli.given_or_file(args, "local", False) is True


def test_demo_run_config_replays_as_the_demo():
    p = train_job.get_args_parser()
    demo = cli.config_from_args(p.parse_args(["--local"]))
    assert demo.data is None and demo.image_size == 64


def test_sweep_best_config_replays_as_a_full_training_run(tmp_path):
    trial = TrainConfig(data="/d", output="/sweeps/s1/abc123", lr=0.0042, unfrozen_depth=3, epochs=8)
    best = {"trial": "abc123", "lr": 0.0042, "unfrozen_depth": 3, "epoch": 5, "f1_samples": 0.7,
            "threshold": {"strategy": "global", "value": 0.3}, "checkpoint": "/sweeps/s1/best",
            "config": trial.to_dict()}
    (tmp_path / "best_config.json").write_text(json.dumps(best))
    args = train_job.get_args_parser().parse_args(["--config", str(tmp_path / "best_config.json"), "--epochs", "20",
                                                   "--output", "/runs/full"])
    cfg = cli.config_from_args(args)
    assert cfg == trial.replace(epochs=20, output="/runs/full")
    # Without --output the trial's folder is not reused (a full run must not resume a trial).
    args = train_job.get_args_parser().parse_args(["--config", str(tmp_path / "best_config.json")])
    assert cli.config_from_args(args).output == TrainConfig().output


def test_a_sweep_config_replays_in_tune(tmp_path):
    sweep = SweepConfig(name="s2", num_samples=4, depths=(1, 2), lr_min=1e-3, lr_max=1e-3)
    replay.write_config(str(tmp_path), "tune", train=TrainConfig(data="/d", batch_size=16), sweep=sweep)
    args = tune_job.get_args_parser().parse_args(["--config", str(tmp_path / "config.json"), "--num-samples", "6"])
    assert cli.sweep_from_args(args) == dataclasses.replace(sweep, num_samples=6)
    assert cli.config_from_args(args).batch_size == 16


def test_bad_config_files_are_usage_errors(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    (tmp_path / "y.json").write_text('{"other": 1}')
    p = train_job.get_args_parser()
    for name, fragment in (("x.json", "not JSON"), ("y.json", "none of the sections"), ("z.json", "cannot read")):
        with pytest.raises(UsageError, match=fragment):
            cli.config_from_args(p.parse_args(["--config", str(tmp_path / name)]))


def test_booleans_take_x_and_no_x_and_compile_takes_a_value_too(capsys):
    p = train_job.get_args_parser()
    assert p.parse_args(["--freeze-bn"]).freeze_bn is True
    assert p.parse_args(["--no-freeze-bn"]).freeze_bn is False
    assert not hasattr(p.parse_args([]), "freeze_bn")  # not given: the config file or the default decides
    assert p.parse_args(["--compile", "--epochs", "2"]).compile == "on"
    assert p.parse_args(["--no-compile"]).compile == "off"
    assert p.parse_args(["--compile", "auto"]).compile == "auto" and not hasattr(p.parse_args([]), "compile")
    assert "[--freeze-bn | --no-freeze-bn]" in " ".join(p.format_usage().split())
    assert p.parse_args(["--wait-for-autoscaler"]).wait_for_autoscaler is True
    for argv in (["--freeze-bn", "maybe"], ["--freeze-bn=false"], ["--compile", "sometimes"], ["--gpu-decode"]):
        with pytest.raises(SystemExit):  # argv is parsed as given: no spelling is rewritten
            p.parse_args(argv)
    assert "expected auto, on, off, got 'sometimes'" in capsys.readouterr().err


def test_predict_local_and_num_workers_have_one_meaning(tmp_path, capsys):
    p = predict_job.get_args_parser()
    base = ["--checkpoint", "runs/r1", "--output", "o"]
    s = predict_job.settings(p.parse_args(base))
    assert s["local"] and s["num_workers"] == 0 and s["loader_workers"] is None  # auto, resolved where it runs
    s = predict_job.settings(p.parse_args(base + ["--num-workers", "4"]))
    assert not s["local"] and s["num_workers"] == 4
    s = predict_job.settings(p.parse_args(base + ["--no-local"]))
    assert not s["local"] and s["num_workers"] == 1
    s = predict_job.settings(p.parse_args(base + ["--num-workers", "0"]))
    assert s["local"] and s["num_workers"] == 0  # no Ray worker: this process
    with pytest.raises(UsageError, match="give one of them"):
        predict_job.settings(p.parse_args(base + ["--local", "--num-workers", "2"]))
    with pytest.raises(UsageError, match="--checkpoint and --output required"):
        predict_job.settings(p.parse_args([]))
    replay.write_config(str(tmp_path), "predict", name="predict_config.json",
                        predict={**predict_job.DEFAULTS, "checkpoint": "gs://b/r1", "output": "gs://b/o",
                                 "num_workers": 8, "local": False})
    s = predict_job.settings(p.parse_args(["--config", str(tmp_path / "predict_config.json"), "--batch-size", "8"]))
    assert s["checkpoint"] == "gs://b/r1" and s["num_workers"] == 8 and not s["local"] and s["batch_size"] == 8
