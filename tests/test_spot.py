"""Spot-native training: a step checkpoint on a notice (SIGTERM, SIGINT) or every --checkpoint-every, resumed at
that step exactly (the same rows, batches, augmentations and random streams), and every interruption recorded;
micro-batches that accumulate to the same step. Ray's preemptions are in tests/test_ray_train.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mlc.config import TrainConfig
from mlc.data.demo import make_demo_dataset
from mlc.data.loader import RankBatches
from mlc.model.checkpoint import load_state
from mlc.train import driver, engine, interrupts
from mlc.train.run_folder import epoch_dir, epoch_of

REPO = Path(__file__).resolve().parents[1]


def test_a_resumed_epoch_reads_only_the_steps_left_and_the_same_rows_at_any_world_size():
    whole = RankBatches(50, 8, shuffle=True, seed=3, epoch=2, drop_last=True)
    for world in (1, 2, 3):
        for first in (0, 2, 5, 6):
            shares = [RankBatches(50, 8, shuffle=True, seed=3, epoch=2, rank=r, world=world, drop_last=True,
                                  first_step=first) for r in range(world)]
            assert all(len(s) == 6 - first for s in shares)
            for k in range(6 - first):
                assert sorted(i for s in shares for i in s.batches[k]) == sorted(whole.batches[first + k])
                assert shares[0].global_sizes[k] == 8


def test_checkpoint_folders_sort_in_training_order_and_name_their_epoch():
    names = [epoch_dir(2), epoch_dir(1, 7), epoch_dir(2, 13), epoch_dir(1), epoch_dir(10), epoch_dir(2, 4)]
    assert sorted(names) == ["epoch_0001", "epoch_0001_step_000007", "epoch_0002", "epoch_0002_step_000004",
                             "epoch_0002_step_000013", "epoch_0010"]
    assert [epoch_of(n) for n in sorted(names)] == [1, 1, 2, 2, 2, 10]


def test_the_schedule_polls_every_step_until_it_knows_a_step_then_every_poll_period(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(interrupts.time, "monotonic", lambda: clock[0])
    s = interrupts.Schedule("10m")
    assert s.proposal(1) == (False, 2)  # no step time yet: the next step
    clock[0] += 0.5
    due, nxt = s.proposal(2)            # 0.5 s a step: four steps make the poll period
    assert not due and nxt == 2 + round(interrupts.POLL_PERIOD_S / 0.5)
    clock[0] += 600
    assert s.proposal(nxt)[0]           # ten minutes since the last checkpoint
    s.checkpointed(3.0)
    assert not s.proposal(nxt + 1)[0]
    assert interrupts.checkpoint_every_s("epoch", 1.0) is None
    assert interrupts.checkpoint_every_s("auto", None) == interrupts.AUTO_FIRST_S
    assert interrupts.checkpoint_every_s("auto", 0.2) == 60.0 and interrupts.checkpoint_every_s("auto", 3.0) == 150.0
    assert interrupts.checkpoint_every_s("90s", None) == 90.0


def test_an_interruption_is_recorded_only_where_a_run_had_not_finished(tmp_path):
    cfg = {"epochs": 3}
    base = {"config": cfg, "step": 0, "reason": "epoch"}
    assert interrupts.interruption({**base, "epoch": 3}, 10, None) is None  # done: a rerun with more epochs
    base["saved_at"] = time.time() - 5
    assert interrupts.interruption({**base, "epoch": 2, "step": 4, "reason": "signal"}, 10, None) == \
        {"epoch": 3, "step": 4, "reason": "signal", "steps_lost": 0, "saved_at": base["saved_at"]}
    (tmp_path / "progress.json").write_text(json.dumps({"epoch": 3, "step": 9}))
    record = interrupts.interruption({**base, "epoch": 1, "step": 2, "reason": "time"}, 10, str(tmp_path))
    assert (record["reason"], record["steps_lost"]) == ("failure", 17)  # 8 more in epoch 2, 9 in epoch 3
    done = interrupts.first_step(record, 2, 1.5)
    assert done["workers"] == 2 and done["restart_to_first_step_s"] == 1.5 and done["checkpoint_to_first_step_s"] >= 5
    assert "saved_at" not in done and "17 step(s) lost" in interrupts.describe(done)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return Path(make_demo_dataset(str(tmp_path_factory.mktemp("spot")), n_train=50, n_test=4, image_size=32, seed=2))


def _cfg(demo: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(demo), output=str(out), weights="none", image_size=32, epochs=3, batch_size=8,
                unfrozen_depth=1, dropout=0.3, val_fraction=0.2, amp="off", inputs="image", loader_workers=0,
                checkpoint_every="epoch", lr=2e-3)
    return TrainConfig(**{**base, **kw})


def _record_rows(monkeypatch) -> dict:
    """{epoch: [row, ...]} of every row a training step takes, in order."""
    seen, last = {}, []
    real = engine.train_step

    def step(model, batch, ctx):
        last[:] = batch.index.tolist()
        return real(model, batch, ctx)
    monkeypatch.setattr(engine, "train_step", step)
    return seen, last


@pytest.fixture(scope="module")
def straight(demo, tmp_path_factory) -> dict:
    """The uninterrupted run the interrupted ones must end as."""
    out = tmp_path_factory.mktemp("straight")
    driver.fit(_cfg(demo, out), log=lambda *_: None, progress=False)
    return load_state(str(out / "checkpoint"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_epoch_checkpoints_that_step_and_the_rerun_ends_where_an_uninterrupted_run_does(
        demo, straight, tmp_path, monkeypatch, signum):
    seen, last = _record_rows(monkeypatch)
    at = {signal.SIGTERM: 2, signal.SIGINT: 3}[signum]  # a step of epoch 2 (5 steps an epoch)

    def hook(epoch, step):
        seen.setdefault(epoch, []).extend(last)
        if (epoch, step) == (2, at):
            os.kill(os.getpid(), signum)
    run = tmp_path / "run"
    stopped = interrupts.Terminated if signum == signal.SIGTERM else interrupts.Interrupted
    with pytest.raises(stopped, match=f"in epoch 2 after step {at}"):
        driver.fit(_cfg(demo, run), log=lambda *_: None, progress=False, on_step=hook)
    state = load_state(str(run / "checkpoint"))
    assert (state["epoch"], state["step"], state["reason"]) == (1, at, "signal")
    assert not (run / "predictions.csv").exists()

    logs = []
    driver.fit(_cfg(demo, run), log=logs.append, progress=False,
               on_step=lambda e, s: seen.setdefault(e, []).extend(last))
    assert any(f"epoch 2 continues after step {at} (signal checkpoint)" in m for m in logs), logs
    a, b = straight, load_state(str(run / "checkpoint"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bit for bit on the CPU
    assert [r["train_loss"] for r in a["history"]] == pytest.approx([r["train_loss"] for r in b["history"]])
    n_train = 5 * 8
    for epoch in (1, 2, 3):  # every row once an epoch (the rows of the dropped last batch aside)
        assert len(seen[epoch]) == n_train == len(set(seen[epoch])), epoch
    record = json.loads((run / "metrics.json").read_text())["interruptions"]
    assert [(r["epoch"], r["step"], r["reason"], r["steps_lost"], r["workers"]) for r in record] == \
        [(2, at, "signal", 0, 1)]
    assert record[0]["restart_to_first_step_s"] > 0


def test_the_job_exits_143_on_sigterm_and_the_same_command_resumes(demo, tmp_path):
    out = tmp_path / "job"
    cmd = [sys.executable, "jobs/train.py", "--local", "--data", str(demo), "--output", str(out), "--weights", "none",
           "--image-size", "32", "--epochs", "3", "--batch-size", "8", "--val-fraction", "0.2", "--amp", "off",
           "--inputs", "image", "--loader-workers", "0", "--checkpoint-every", "epoch"]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.json").exists():  # epoch 1 is done: the signal lands inside epoch 2 or 3
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 143, stderr[-2000:]
    assert stderr.startswith("error: stopped by SIGTERM in epoch "), stderr
    state = load_state(str(out / "checkpoint"))
    assert state["reason"] == "signal" and state["step"] > 0
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"continues after step {state['step']} (signal checkpoint)" in r.stdout


def test_a_kill_without_notice_loses_only_the_steps_since_the_last_timed_checkpoint(demo, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "jobs/train.py", "--local", "--data", str(demo), "--output", str(out), "--weights", "none",
           "--image-size", "32", "--epochs", "3", "--batch-size", "8", "--val-fraction", "0.2", "--amp", "off",
           "--inputs", "image", "--loader-workers", "0", "--checkpoint-every", "1s"]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, deadline = set(), time.time() + 300
    while len(seen) < 3:  # three step checkpoints written: the periodic net works
        assert p.poll() is None and time.time() < deadline
        try:
            state = load_state(str(out / "checkpoint"))
        except Exception:  # noqa: BLE001 - not there yet
            state = None
        if state is not None and state["step"]:
            seen.add((state["epoch"], state["step"]))
        time.sleep(0.02)
    p.kill()
    p.wait()
    last = load_state(str(out / "checkpoint"))
    assert last["reason"] == "time" and (last["epoch"], last["step"]) >= max(seen)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"epoch {last['epoch'] + 1} continues after step {last['step']} (time checkpoint)" in r.stdout
    record = json.loads((out / "metrics.json").read_text())["interruptions"]
    assert [(x["epoch"], x["step"], x["reason"]) for x in record] == [(last["epoch"] + 1, last["step"], "failure")]


def test_a_resume_on_another_table_is_refused_naming_it(demo, tmp_path):
    """The order of an epoch's rows follows from the rows: a checkpoint taken on one table is not resumed on
    another (exit 8), even when its settings and labels are the same."""
    from mlc import errors
    from mlc.model.checkpoint import ConfigMismatch
    data = tmp_path / "data"
    import shutil
    shutil.copytree(demo, data)
    driver.fit(_cfg(data, tmp_path / "run", epochs=1), log=lambda *_: None, progress=False)
    from mlc.data.table import read_table, submission_csv
    table = read_table(str(data / "train.csv"))[1:]  # one row fewer
    (data / "train.csv").write_text(submission_csv(table.ImageID, table.Labels))
    with pytest.raises(ConfigMismatch, match="the training table changed") as e:
        driver.fit(_cfg(data, tmp_path / "run", epochs=2), log=lambda *_: None, progress=False)
    assert errors.classify(e.value)[0] == errors.RESUME == 8


def test_micro_batches_accumulate_to_the_whole_batchs_step(demo, tmp_path):
    """The same run with every share split into forward passes of 4 rows: their gradients add up to the whole
    batch's, as two DDP ranks' do, so the weights agree within the DDP-equivalence bound measured under the
    same settings (tests/test_ray_train.py: BatchNorm frozen, streamed, 1 intra-op thread), far inside the
    distance of a run with another seed. The hash split, as there: on this 50-row set the stratified split's
    run amplifies the summation's last-bit differences to an L2 of 0.97 in three epochs (the hash split's: 7e-5),
    which says nothing about the summing tested here. bce, as that bound was measured: asl's clip and fourth power
    amplify the same last-bit differences further (an L2 of 0.087 seen), again nothing about the summing."""
    from test_ray_train import L2_VS_LOCAL, SPLIT_INVARIANT, l2_difference
    whole, split, other = tmp_path / "whole", tmp_path / "split", tmp_path / "other"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for out, kw in ((whole, {}), (split, {"micro_batch": 4}), (other, {"seed": 1})):
            cfg = _cfg(demo, out, **{**SPLIT_INVARIANT, "split": "hash", "loss": "bce", **kw})
            driver.fit(cfg, log=lambda *_: None, progress=False)
    finally:
        torch.set_num_threads(threads)
    a, b, c = (load_state(str(d / "checkpoint")) for d in (whole, split, other))
    assert b["micro_batch"] == 4 and a["micro_batch"] == 8
    assert l2_difference(a["model"], b["model"]) <= L2_VS_LOCAL < l2_difference(a["model"], c["model"])
