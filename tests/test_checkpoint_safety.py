"""Training checkpoints load with weights_only=True: plain data round-trips, pickled code is refused unrun."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch

from mlc.model.checkpoint import CheckpointError, load_state, plain_data, save_state


def _state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "epoch": 2, "best_f1": -math.inf,
            "history": [{"epoch": np.int64(1), "f1_samples": np.float32(0.5), "f1_per_class": np.array([0.1, 0.2]),
                         "threshold": {"strategy": "per_class", "value": np.array([0.3, 0.4])}}],
            "config": {"lr": 1e-3, "amp": "auto", "loader_workers": None}, "labels": ["1", "2"],
            "threshold": {"strategy": "global", "value": np.float64(0.25)}, "bad_images": {"x.jpg": "broken"},
            "scaler": None}


def test_training_state_round_trips_as_plain_data(tmp_path):
    state = _state()
    save_state(str(tmp_path), state)
    back = load_state(str(tmp_path))
    assert back["history"][0]["f1_per_class"] == pytest.approx([0.1, 0.2])
    assert back["history"][0]["threshold"]["value"] == pytest.approx([0.3, 0.4])
    assert isinstance(back["history"][0]["epoch"], int) and back["best_f1"] == -math.inf
    assert back["threshold"]["value"] == 0.25 and back["bad_images"] == {"x.jpg": "broken"}
    # The optimizer keeps its integer parameter keys and tuples: it loads into a fresh optimizer.
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(back["optimizer"])
    assert torch.equal(back["model"]["weight"], state["model"]["weight"])


def test_objects_that_are_not_plain_data_are_refused_when_saving(tmp_path):
    with pytest.raises(CheckpointError, match=r"history.*\[0\].*'bad'.*object"):
        plain_data({"history": [{"bad": object()}]})


class _Payload:
    """Unpickling this creates a file: the proof that a load ran code from the checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_state_pt_carrying_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "epoch_0003"
    run.mkdir()
    buf = io.BytesIO()
    torch.save({"model": {}, "epoch": 3, "history": [_Payload(str(marker))]}, buf)
    (run / "state.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError) as e:
        load_state(str(run))
    assert str(run / "state.pt") in str(e.value) and "--fresh" in str(e.value)
    assert not marker.exists()
    assert not os.path.exists("pwned")
