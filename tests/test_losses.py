"""The training losses (mlc.train.losses) against their reference implementations, --pos-weight auto on the real
table, and the weight average (mlc.train.ema): its arithmetic, what it averages, its checkpoint and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlc.config import TrainConfig
from mlc.train.losses import POS_WEIGHT_CAP, LabelLoss, auto_pos_weight, make_loss


def _batch(seed=0, rows=16, labels=18):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, labels, generator=g) * 3
    y = (torch.rand(rows, labels, generator=g) < 0.2).float()
    return logits, y


def test_bce_and_asl_without_focusing_are_torchs_bce():
    logits, y = _batch()
    want = F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / y.shape[1]
    torch.testing.assert_close(LabelLoss("bce")(logits, y), want)
    torch.testing.assert_close(LabelLoss("asl", 0.0, 0.0, 0.0)(logits, y), want)


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", [(4, 0, 0.05), (4, 1, 0.05), (2, 1, 0.0), (3, 0, 0.2)])
@pytest.mark.parametrize("weighted", [False, True])
def test_asl_is_timms_asymmetric_loss(gamma_neg, gamma_pos, clip, weighted):
    timm_loss = pytest.importorskip("timm.loss").AsymmetricLossMultiLabel
    logits, y = _batch(1)
    w = torch.linspace(0.3, 10.0, y.shape[1]) if weighted else None
    theirs = timm_loss(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, reduction="sum", pos_weight=w)
    ours = LabelLoss("asl", gamma_neg, gamma_pos, clip, pos_weight=w)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    want, got = theirs(a, y) / y.shape[1], ours(b, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want.backward()
    got.backward()  # timm differentiates the focusing weight too
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


def test_focal_is_torchvisions_sigmoid_focal_loss():
    from torchvision.ops import sigmoid_focal_loss
    logits, y = _batch(2)
    cfg = TrainConfig(loss="focal", focal_gamma=2.0)
    want = sigmoid_focal_loss(logits, y, alpha=-1, gamma=2.0, reduction="sum") / y.shape[1]
    torch.testing.assert_close(make_loss(cfg, y.numpy())(logits, y), want, rtol=1e-5, atol=1e-6)


def test_easy_negatives_cost_nothing_under_asl_and_the_positives_weight_scales_only_positives():
    logits = torch.tensor([[-6.0, 2.0, -1.0]])  # p = 0.0025 (under the 0.05 clip), 0.88, 0.27
    asl = LabelLoss("asl", 4.0, 0.0, 0.05)
    g = logits.clone().requires_grad_()
    asl(g, torch.zeros(1, 3)).backward()
    assert g.grad[0, 0] == 0 and g.grad[0, 1] > 0 and g.grad[0, 2] > 0
    y = torch.tensor([[1.0, 0.0, 1.0]])
    w = torch.tensor([3.0, 3.0, 0.5])
    for name in ("bce", "asl"):
        plain, weighted = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        LabelLoss(name, 4.0 * (name == "asl"), 0.0, 0.05 * (name == "asl"))(plain, y).backward()
        LabelLoss(name, 4.0 * (name == "asl"), 0.0, 0.05 * (name == "asl"), pos_weight=w)(weighted, y).backward()
        # positives (columns 0 and 2) scaled by their weight, the negative (column 1) untouched
        torch.testing.assert_close(weighted.grad, plain.grad * torch.tensor([3.0, 1.0, 0.5]))


def test_auto_pos_weight_on_the_real_table_is_negatives_over_positives_capped(real_train):
    from mlc.data.labels import LabelVocab
    vocab = LabelVocab.from_label_lists(real_train.Labels)
    y = vocab.encode(real_train.Labels)
    w = auto_pos_weight(y)
    n = len(real_train)
    person = sum("1" in labels for labels in real_train.Labels)  # label 1 is on 76% of the rows
    assert w[vocab.index["1"]] == pytest.approx((n - person) / person, rel=1e-6) and w[vocab.index["1"]] < 0.4
    rare = sum("14" in labels for labels in real_train.Labels)  # 0.84%: uncapped ~118
    assert (n - rare) / rare > 100 and w[vocab.index["14"]] == POS_WEIGHT_CAP
    assert auto_pos_weight(np.zeros((4, 2)))[0] == POS_WEIGHT_CAP  # no positive at all: the cap, not a division by 0
    assert make_loss(TrainConfig(pos_weight="none"), y).pos_weight is None


@pytest.mark.parametrize("flags,message", [
    (["--loss", "hinge"], "invalid choice: 'hinge'"),
    (["--ema", "-0.1"], "--ema must be in [0, 1)"),
    (["--ema", "nan"], "--ema must be a finite number"),
    (["--asl-gamma-neg", "-1"], "--asl-gamma-neg must be >= 0"),
    (["--focal-gamma", "inf"], "--focal-gamma must be a finite number"),
])
def test_bad_loss_and_decay_settings_are_one_usage_error(flags, message, tmp_path, capsys):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import train as train_job
    from mlc.cli import run_job
    with pytest.raises(SystemExit) as e:
        run_job(train_job.main, train_job.get_args_parser(), ["--local", "--output", str(tmp_path / "r"), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and not (tmp_path / "r").exists()
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_the_average_follows_timms_rule_skips_skipped_steps_and_resumes():
    from mlc.train.ema import Ema
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)  # frozen: never averaged, taken from the model
    ema = Ema(model, 0.9)
    assert ema.names == ["1.weight", "1.bias", "1.running_mean", "1.running_var", "2.weight", "2.bias"]
    want = {n: t.clone() for n, t in model.state_dict().items()}
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1)
            model[1].running_mean.add_(1.0)
        skipped = step == 7
        ema.update(torch.tensor(skipped))
        if not skipped:
            d = min(0.9, (1 + step) / (10 + step))  # a skipped step still counts for the warm-up
            for n in ema.names:
                want[n] = d * want[n] + (1 - d) * model.state_dict()[n]
    got = ema.averaged_copy(model).state_dict()
    for n in ema.names:
        torch.testing.assert_close(got[n], want[n].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["0.weight"], model[0].weight)  # frozen: the model's own
    again = Ema(model, 0.9)
    again.load(ema.to_dict())
    assert again.digest() == ema.digest() and again.updates == ema.updates == 30


def test_ranks_take_rank_0s_batchnorm_statistics_and_a_difference_left_is_refused():
    from mlc.train.ema import Ema
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ranks = [Ema(model, 0.9), Ema(model, 0.9)]
    ranks[1].shadow[ranks[1].names.index("1.running_mean")].add_(1.0)  # rank 1's own batch statistics
    assert ranks[0].digest() != ranks[1].digest()
    calls = []

    def all_gather(obj):  # both ranks' objects, as the group returns them; rank 1's turn
        calls.append(obj)
        first = {n: ranks[0].weights()[n] for n in obj} if isinstance(obj, dict) else ranks[0].digest()
        return [first, obj]
    ranks[1].agree(all_gather)
    assert ranks[0].digest() == ranks[1].digest()
    assert set(calls[0]) == {"1.running_mean", "1.running_var"}  # only the buffers travel
    ranks[1].shadow[0].add_(1.0)  # a parameter apart: a bug, refused
    with pytest.raises(RuntimeError, match="averages differ"):
        ranks[1].agree(all_gather)
