"""``--compile auto``'s rule, and validation at the training batch's shape (padded, scores unchanged)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlc.config import TrainConfig
from mlc.model.compiling import decide
from mlc.migrate import migrate
from mlc.prediction.scores import pad_rows, predict_scores


def test_compile_auto_compiles_long_gpu_runs_only():
    on, why = decide("auto", "cuda", 60 * 27_000, 4)  # a 60-epoch full fine-tune on COMP5329
    assert on and "on" in why
    on, why = decide("auto", "cuda", 10 * 27_000, 1)  # the report's 10 epochs at depth 1: not worth a compile
    assert not on and "off" in why and "270,000" in why
    assert decide("auto", "cpu", 10**9, 4)[0] is False  # measured not to pay on a CPU
    assert decide("on", "cpu", 1, 1)[0] is True and decide("off", "cuda", 10**9, 4)[0] is False


def test_compile_setting_reads_old_checkpoints_and_refuses_nonsense():
    assert TrainConfig.from_dict(migrate({"compile": True})).compile == "on"
    assert TrainConfig.from_dict(migrate({"compile": False})).compile == "off"
    with pytest.raises(ValueError, match="--compile must be auto, on or off"):
        TrainConfig(compile="sometimes")
    with pytest.raises(ValueError, match="--store must be"):
        TrainConfig(store="cloud")
    with pytest.raises(ValueError, match="--store-budget must be >= 0"):
        TrainConfig(store_budget=-1.0)


def test_padding_a_batch_to_the_training_shape_changes_no_score():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    ids, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3])
    (px,) = pad_rows((x,), 5)
    assert px.shape == (5, 3, 8, 8) and torch.equal(px[:3], x) and not px[3:].any()
    _, pids, poffs = pad_rows((x, ids, offsets), 5)
    assert torch.equal(pids, ids) and poffs.tolist() == [0, 1, 3, 3, 3]  # two empty bags
    assert pad_rows((x,), 3)[0] is x and pad_rows((x,), None)[0] is x

    class Net(torch.nn.Module):  # BatchNorm in eval mode: each row's score depends on that row alone
        def __init__(self):
            super().__init__()
            self.c, self.bn, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.bn(self.c(x)).mean((2, 3)))

    from mlc.data.batch import Batch, Reads
    reads = Reads(images=True, captions=False, side=8)
    rows = [Batch(torch.arange(k, k + n), torch.zeros(n, 0), reads,
                  images=torch.randint(0, 255, (n, 3, 8, 8), dtype=torch.uint8)) for k, n in ((0, 4), (4, 4), (8, 3))]

    net = Net().eval()
    plain = predict_scores(net, rows, torch.device("cpu"), progress=False, n_rows=11)
    padded = predict_scores(net, rows, torch.device("cpu"), progress=False, n_rows=11, pad_to=4)
    assert plain["ok"].all() and np.allclose(plain["probs"], padded["probs"], atol=1e-6)
