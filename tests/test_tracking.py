"""TensorBoard events read back, job logs under a non-TTY, config.json of a real run replayed."""

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

from tensorboardX.proto import event_pb2

from mlc import logs
from mlc.io import storage
from mlc.train.tracking import Board
from test_errors import FAST, tiny_dataset

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (warning: |error: |debug: )?\S")


def events(data: bytes) -> list:
    """The Event protos of one TFRecord event file (length, crc, payload, crc per record)."""
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
        i += 12 + n + 4
    return out


def scalars(files: list) -> dict:
    """tag -> {step: value} over every event file of a run (a resume adds one)."""
    out: dict = {}
    for data in files:
        for e in events(data):
            for v in e.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, {})[e.step] = v.simple_value
    return out


ROW = {"epoch": 1, "train_loss": 0.5, "val_loss": 0.6, "f1_samples": 0.7, "f1_micro": 0.71, "f1_macro": 0.6,
       "map": 0.8, "lr": 1e-3, "train_img_per_s": 50.0, "val_img_per_s": float("nan"),
       "threshold": {"strategy": "global", "value": 0.35}}


def test_board_writes_scalars_to_a_remote_url_through_storage():
    url = "memory://tb-test/run/tensorboard"
    b = Board(url)
    b.epoch(ROW)
    b.epoch({**ROW, "epoch": 2, "train_loss": 0.25})
    b.per_class(["cat", "dog"], [0.5, 0.9], [0.6, float("nan")], step=2)
    b.close()
    names = storage.listdir(url)
    assert names and all("tfevents" in n for n in names)
    s = scalars([storage.read_bytes(storage.join(url, n.rsplit("/", 1)[-1])) for n in names])
    assert s["loss/train"] == {1: 0.5, 2: 0.25}
    assert abs(s["threshold/global"][1] - 0.35) < 1e-6 and abs(s["f1/samples"][2] - 0.7) < 1e-6
    assert s["f1_per_class/dog"] == {2: 0.8999999761581421} and "ap_per_class/dog" not in s
    assert "img_per_s/val" not in s  # NaN is left out, not plotted as a gap of garbage


def test_heartbeat_lines_are_rate_limited_and_say_step_speed_loss_and_eta():
    t = [0.0]
    lines = []
    hb = logs.Heartbeat(range(10), desc="epoch 1/3", total=None, every_s=30, log=lines.append, clock=lambda: t[0])
    for i in hb:
        t[0] += 10  # 10 s a step
        if i == 4:
            hb.set_postfix(loss="0.4321", img_s="12.5")
    assert len(lines) == 4  # steps 3, 6, 9 and the end: at most one line every 30 s
    assert lines[1] == "epoch 1/3: step 6/10, loss 0.4321, 12.5 img/s, ETA 40s"
    assert lines[-1] == "epoch 1/3: done, 10 steps in 1m40s"


def test_log_lines_have_a_timestamp_a_level_and_a_rank(capsys):
    import io
    buf = io.StringIO()
    logs.setup(logs.NORMAL, rank=1, stream=buf)
    try:
        logs.say("hello")
        logs.say("warning: careful")
        logs.LOGGER.debug("hidden")
    finally:
        logs.setup()
    logs.setup(logs.VERBOSE, stream=buf)
    try:
        logs.LOGGER.debug("shown with --verbose")
    finally:
        logs.setup()
    out = buf.getvalue().splitlines()
    assert out[2].endswith(" debug: shown with --verbose") and len(out) == 3
    out = out[:2]
    assert len(out) == 2 and all(LINE.match(re.sub(r"\[rank 1\] ", "", x)) for x in out), out
    assert out[0].endswith("[rank 1] hello") and out[1].endswith("[rank 1] warning: careful")


def test_a_local_run_logs_plain_lines_writes_tensorboard_and_a_replayable_config(tmp_path):
    root = tiny_dataset(tmp_path / "ds")
    out = tmp_path / "run"
    cmd = [sys.executable, "jobs/train.py", "--local", "--data", str(root), "--output", str(out), *FAST,
           "--epochs", "2"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)  # pipes: not a TTY
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout + r.stderr
    assert "\r" not in text
    lines = r.stdout.strip().splitlines()
    assert all(LINE.match(x) for x in lines), [x for x in lines if not LINE.match(x)][:5]
    assert sum("epoch 1/2" in x for x in lines) <= 4  # the epoch line, its phases' end lines, few heartbeats

    s = scalars([p.read_bytes() for p in (out / "tensorboard").iterdir()])
    assert set(s["loss/train"]) == {1, 2} and set(s["f1/macro"]) == {1, 2} and "lr" in s
    assert {"f1_per_class/1", "f1_per_class/2"} <= set(s)

    saved = json.loads((out / "config.json").read_text())
    assert saved["job"] == "train" and saved["local"] is True and saved["train"]["epochs"] == 2
    assert saved["train"]["weight_decay"] == 0.01 and saved["mlc_version"]
    # The saved config, replayed with one flag changed, is the same run but that setting.
    sys.path.insert(0, str(REPO / "jobs"))
    import train as train_job
    from mlc.cli import config_from_args
    from mlc.config import TrainConfig
    args = train_job.get_args_parser().parse_args(["--config", str(out / "config.json"), "--epochs", "3"])
    assert config_from_args(args) == TrainConfig.from_dict(saved["train"]).replace(epochs=3)
    # A rerun with other settings is refused (exit 8) and leaves the run's config.json as it was.
    from mlc import errors
    r = subprocess.run(cmd + ["--lr", "0.05"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == errors.RESUME and "other settings" in r.stderr, r.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == saved["train"]["lr"]
