"""Model: freezing per depth, frozen BatchNorm, dropout placement, plain-torchvision checkpoints, weights loading."""

import io
import urllib.error

import pytest
import torch
import torchvision

from mlc.model import resnet as M

N = 5
STAGE_PREFIXES = {  # written out independently of mlc.model.resnet's tables
    0: ("fc.",),
    1: ("layer4.", "fc."),
    2: ("layer3.", "layer4.", "fc."),
    3: ("layer2.", "layer3.", "layer4.", "fc."),
    4: ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.", "fc."),
}


@pytest.mark.parametrize("depth", [0, 1, 2, 3, 4])
def test_exactly_the_intended_parameters_get_gradients(depth):
    torch.manual_seed(0)
    m = M.build_model(N, unfrozen_depth=depth, dropout=0.0)
    m.train()
    m(torch.randn(2, 3, 64, 64)).sum().backward()
    for name, p in m.named_parameters():
        should = name.startswith(STAGE_PREFIXES[depth])
        assert p.requires_grad == should, name
        assert (p.grad is not None) == should, name
        if should:
            assert p.grad.abs().sum() > 0, name


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_its_statistics():
    m = M.build_model(N, unfrozen_depth=1, dropout=0.0)
    m.train()
    assert not m.bn1.training and not m.layer3[0].bn1.training
    assert m.layer4[0].bn1.training
    before = m.layer3[0].bn1.running_mean.clone()
    before4 = m.layer4[0].bn1.running_mean.clone()
    m(torch.randn(4, 3, 64, 64) * 3 + 1)
    assert torch.equal(before, m.layer3[0].bn1.running_mean)
    assert not torch.equal(before4, m.layer4[0].bn1.running_mean)


def test_dropout_acts_at_the_frozen_boundary_in_training_only():
    torch.manual_seed(0)
    m = M.build_model(N, unfrozen_depth=1, dropout=0.5)
    x = torch.randn(2, 3, 64, 64)
    m.train()
    assert not torch.allclose(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))
    assert M.build_model(N, unfrozen_depth=4, dropout=0.5).first_trainable == 0  # nothing frozen, no dropout


def test_saved_state_dict_loads_into_plain_torchvision(tmp_path):
    torch.manual_seed(0)
    m = M.build_model(N, unfrozen_depth=2, dropout=0.3)
    wrapped = torch.nn.DataParallel(m)  # a wrapper that adds "module." like DDP does
    state = M.bare_state_dict(wrapped)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    torch.save(state, tmp_path / "model.pt")
    plain = torchvision.models.resnet50(num_classes=N)
    plain.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))  # strict
    m.eval(), plain.eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(m(x), plain(x), atol=1e-5)


def test_weights_from_a_path_strip_prefixes_and_replace_a_mismatched_head(tmp_path):
    torch.manual_seed(1)
    src = torchvision.models.resnet50(num_classes=1000)
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "w.pt")
    logs = []
    m = M.build_model(N, unfrozen_depth=1, weights=str(tmp_path / "w.pt"), log=logs.append)
    assert torch.equal(m.layer2[0].conv1.weight, src.layer2[0].conv1.weight)
    assert m.fc.weight.shape == (N, 2048)
    assert any("head" in line for line in logs)


def test_weights_errors_are_actionable(tmp_path, monkeypatch):
    with pytest.raises(M.WeightsError, match="not found"):
        M.load_weights(str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(M.WeightsError, match="not a loadable state dict"):
        M.load_weights(str(tmp_path / "junk.pt"))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(type(M.ResNet50_Weights.IMAGENET1K_V2), "get_state_dict", offline)
    with pytest.raises(M.WeightsError, match="--weights none") as e:
        M.load_weights("imagenet")
    assert "PATH_OR_URL" in str(e.value)


def test_state_dict_bytes_are_weights_only_loadable():
    m = M.build_model(3, unfrozen_depth=0)
    buf = io.BytesIO()
    torch.save(M.bare_state_dict(m), buf)
    buf.seek(0)
    assert set(torch.load(buf, weights_only=True)) == set(torchvision.models.resnet50(num_classes=3).state_dict())


def test_folding_batchnorm_into_the_convolutions_keeps_the_function_and_the_checkpoint_keys():
    from mlc.model.resnet import bare_state_dict, build_model, fold_batchnorm
    torch.manual_seed(0)
    model = build_model(5, unfrozen_depth=2, dropout=0.0, weights="none")
    for m in model.modules():  # statistics far from the identity, so a wrong fold shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.3, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    keys = set(bare_state_dict(model))
    model.train()
    folded = fold_batchnorm(model)
    assert model.training and not folded.training  # the original is left as it was
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 53
    assert set(bare_state_dict(model)) == keys
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        want, got = model(x), folded(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (want - model.fc(torch.zeros(1, 2048))).abs().max() > 1e-2  # the check is not vacuous


def test_the_scoring_copy_in_bf16_gives_autocast_s_scores_bit_for_bit():
    """Weights cast once to the autocast precision score exactly as fp32 weights cast by autocast on every
    call; the caption branch of a fused model stays fp32."""
    from mlc.model.fusion import build, for_scoring
    from mlc.model.resnet import fold_batchnorm
    torch.manual_seed(0)
    model = M.build_model(5, unfrozen_depth=1, dropout=0.0, weights="none")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.3, 2.0)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    fp32, low = fold_batchnorm(model), fold_batchnorm(model, torch.bfloat16)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the original is untouched
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = fp32(x).float(), low(x).float()
    assert torch.equal(got, want) and want.abs().max() > 1e-2
    fused = for_scoring(build("image+caption", 5, num_tokens=7, unfrozen_depth=1, weights="none"), torch.bfloat16)
    assert {p.dtype for p in fused.image.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fused.text.parameters()} | {p.dtype for p in fused.head.parameters()} == {torch.float32}


@pytest.mark.parametrize("depth", [1, 3])
def test_training_steps_run_the_frozen_stages_folded_with_the_same_result(depth):
    """In training the frozen stages (BatchNorm in eval mode) run as a folded copy: the same loss and
    gradients as the plain stages, rebuilt when a frozen weight changes, never in the state_dict."""
    torch.manual_seed(0)
    # freeze_bn: a trainable BatchNorm in training mode normalises a batch of 4 by its own statistics, which
    # magnifies any rounding (a 1e-6 change of the input moved these gradients by 3%); the frozen stages are
    # in eval mode either way.
    model = M.build_model(N, unfrozen_depth=depth, dropout=0.0, weights="none", freeze_bn=True)
    for m in model.modules():  # statistics far from the identity, so a wrong fold shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.3, 2.0)
    keys = set(model.state_dict())
    x = torch.randn(4, 3, 64, 64)
    model.train()

    def loss_and_grads(use_prefix: bool):
        model.zero_grad()
        if use_prefix:
            out = model(x)
        else:  # the plain stages, as eval-mode scoring runs them
            with torch.no_grad():
                h = x
                for i in range(model.first_trainable):
                    h = model._run_stage(i, h)
            for i in range(model.first_trainable, len(M.STAGES)):
                h = model._run_stage(i, h)
            out = h
        loss = out.square().mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads(False)
    folded_loss, folded = loss_and_grads(True)
    prefix = model.__dict__["_prefix_cache"]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prefix.modules())
    assert folded_loss == pytest.approx(plain_loss, rel=1e-4)
    assert plain.keys() == folded.keys() and plain
    for name in plain:  # float rounding only: within 0.1% of each gradient's largest entry
        assert (folded[name] - plain[name]).abs().max() <= 1e-3 * plain[name].abs().max(), name
    assert set(model.state_dict()) == keys and prefix not in list(model.modules())
    # Copies (the scoring copy each validation makes) do not carry it along.
    assert "_prefix_cache" not in M.fold_batchnorm(model).__dict__ and model.__dict__["_prefix_cache"] is prefix

    model(x)
    assert model.__dict__["_prefix_cache"] is prefix  # reused while the weights stay
    state = model.state_dict()
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"] * 2  # a frozen weight changes
    model.load_state_dict(state)
    assert "_prefix_cache" not in model.__dict__
    with torch.no_grad():
        new = model._frozen_prefix()(x)
        h = x
        for i in range(model.first_trainable):
            h = model._run_stage(i, h)
    torch.testing.assert_close(new, h, atol=1e-3, rtol=1e-4)
    model.to(torch.float64)  # moved or cast: dropped, and rebuilt from the new tensors
    assert "_prefix_cache" not in model.__dict__
    assert model(x.double()).dtype == torch.float64
