"""--refit RUN: every labelled row trains for the run's best epoch count, the run's threshold is kept and said
where it came from, and a refit that would train on another table or write into its run is refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import mlc
from mlc.config import TrainConfig
from test_captions import FAST, _dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))
import train as train_job  # noqa: E402
from mlc.cli import run_job  # noqa: E402


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished caption run (3 epochs) through the job, as a user makes one."""
    tmp = tmp_path_factory.mktemp("refit")
    root = _dataset(tmp / "ds", n=24, images=False)
    run = tmp / "run"
    with pytest.raises(SystemExit) as e:
        run_job(train_job.main, train_job.get_args_parser(),
                ["--local", "--data", str(root), "--output", str(run), "--inputs", "caption", "--weights", "none",
                 "--epochs", "3", "--batch-size", "8", "--amp", "off", "--loader-workers", "0", "--lr", "0.05",
                 "--val-fraction", "0.25", "--warmup-epochs", "0", "--ema", "0.5", "--quiet"])
    assert e.value.code == 0
    return root, run


def _refit(args, capsys):
    with pytest.raises(SystemExit) as e:
        run_job(train_job.main, train_job.get_args_parser(), ["--local", *map(str, args)])
    return e.value.code, capsys.readouterr()


def test_a_refit_trains_on_every_row_keeps_the_runs_threshold_and_says_so(finished, tmp_path, capsys):
    root, run = finished
    meta = json.loads((run / "best" / "meta.json").read_text())
    out = tmp_path / "final"
    code, printed = _refit(["--refit", run, "--output", out], capsys)
    assert code == 0, printed.err
    config = json.loads((out / "config.json").read_text())
    assert config["refit"]["threshold"] == meta["threshold"] and config["refit"]["run"] == str(run)
    assert config["refit"]["threshold_from"] == str(run / "best" / "meta.json")
    assert config["train"]["refit"] == str(run) and config["train"]["epochs"] == meta["epoch"]
    assert config["train"]["ema"] == 0.5 and config["train"]["inputs"] == "caption"  # the run's settings
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["train_images"] for e in metrics["epochs"]] == [24] * meta["epoch"]  # every row, no validation
    assert all(e["val_images"] == 0 for e in metrics["epochs"])
    assert metrics["refit"]["threshold"] == meta["threshold"] and metrics["threshold"] == meta["threshold"]
    assert json.loads((out / "best" / "meta.json").read_text())["threshold"] == meta["threshold"]
    assert len(mlc.read_table(str(out / "predictions.csv"))) == 6
    assert f"the threshold is the one {run / 'best' / 'meta.json'} chose on that run's validation split" in printed.out
    from mlc.model.checkpoint import load_state
    state = load_state(str(out / "checkpoint"))
    assert state["ema"]["updates"] == 3 * meta["epoch"]  # 24 rows in batches of 8
    # the model kept is the last epoch's, its weight average
    assert json.loads((out / "best" / "meta.json").read_text())["epoch"] == meta["epoch"]


def test_a_refit_on_another_table_into_its_own_run_or_of_no_run_is_refused(finished, tmp_path, capsys):
    root, run = finished
    other = _dataset(tmp_path / "other", n=24, images=False)
    lines = (other / "train.csv").read_text().splitlines()
    lines[3] = lines[3].replace("2.jpg,2,", "2.jpg,1,")  # one row relabelled
    (other / "train.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "final"
    code, printed = _refit(["--refit", run, "--output", out, "--data", other], capsys)
    assert code == 8 and "that run was trained on another table" in printed.err, printed.err
    assert not out.exists() or [p.name for p in out.iterdir()] == []
    code, printed = _refit(["--refit", run, "--output", run], capsys)
    assert code == 2 and "would write into the run it refits" in printed.err
    code, printed = _refit(["--refit", tmp_path / "nothing", "--output", out], capsys)
    assert code == 2 and "not a finished run" in printed.err
    assert [line.startswith("error:") for line in printed.err.strip().splitlines()] == [True]
    with pytest.raises(ValueError, match="--refit"):
        from mlc.cli import config_from_args
        config_from_args(train_job.get_args_parser().parse_args(["--refit", str(run), "--config", "x.json"]))
    assert TrainConfig().refit is None
