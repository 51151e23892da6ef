"""--model NAME (any timm model) and --weights files: a timm network stays timm's own, trains its last k stages,
fuses with captions, loads .safetensors files and snapshot folders, and trains, resumes, predicts, serves and
exports as ResNet50 does; an unknown name, timm missing, and weights out of reach offline are one clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mlc
from mlc.config import TrainConfig
from mlc.errors import KNOWN
from mlc.model.fusion import build, for_scoring
from mlc.model.weights import WeightsError, load_weights
from test_captions import FAST, _dataset

timm = pytest.importorskip("timm")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))
import train as train_job  # noqa: E402
from mlc.cli import run_job  # noqa: E402

NAME = "convnext_atto"  # timm's smallest ConvNeXt: 3.7M parameters, 4 stages
N = 3


def _trainable(net) -> set:
    return {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("stages.") else "")
            for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("depth,trains", [
    (0, {"head"}),
    (1, {"stages.3", "head"}),
    (2, {"stages.2", "stages.3", "head"}),
    (9, {"stem", "stages.0", "stages.1", "stages.2", "stages.3", "head"}),
])
def test_a_timm_network_is_timms_own_and_trains_its_last_k_stages(depth, trains):
    torch.manual_seed(0)
    net = build("image", N, model=NAME, unfrozen_depth=depth, dropout=0.3, weights="none")
    timm.create_model(NAME, num_classes=N).load_state_dict(net.state_dict())  # loads unchanged, strict
    assert _trainable(net) == trains
    net.train()
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in net.parameters())
    if depth < 4:
        frozen = [m for name, m in net.named_modules() if name.startswith("stem") and not list(m.children())]
        assert frozen and not any(m.training for m in frozen)  # frozen stages stay in eval mode


def test_dropout_acts_at_the_frozen_boundary_in_training_only():
    torch.manual_seed(0)
    net = build("image", N, model=NAME, unfrozen_depth=1, dropout=0.9, weights="none").train()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    a = net(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, net(x))  # dropout in training
    net.eval()
    assert torch.equal(net(x), net(x))
    plain = timm.create_model(NAME, num_classes=N).eval()
    plain.load_state_dict(net.state_dict())
    torch.testing.assert_close(net(x), plain(x))  # none in eval: timm's own function


def test_safetensors_files_and_snapshot_folders_load_and_a_foreign_head_starts_fresh(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    source = timm.create_model(NAME, num_classes=10)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "snap").mkdir()
    save_file(source.state_dict(), str(tmp_path / "snap" / "model.safetensors"))
    for spec in (tmp_path / "w.safetensors", tmp_path / "snap"):
        logs: list = []
        net = build("image", N, model=NAME, weights=str(spec), log=logs.append)
        got = net.state_dict()
        assert all(torch.equal(got[k], v) for k, v in source.state_dict().items() if not k.startswith("head.fc."))
        assert any("head (head.fc) does not fit these labels" in m for m in logs), logs
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_weights(str(tmp_path / "bad.safetensors"), NAME)
    with pytest.raises(WeightsError, match="do not fit this network"):
        build("image", N, model="efficientnet_b0", weights=str(tmp_path / "w.safetensors"))


def test_imagenet_weights_out_of_reach_name_the_cache_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def offline(*args, pretrained=False, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError) as e:
        load_weights("imagenet", NAME)
    assert "HF_HOME" in str(e.value) and "hub" in str(e.value) and "--weights none" in str(e.value)
    assert KNOWN[f"{WeightsError.__module__}.WeightsError"] == 5
    from torchvision.models import ResNet50_Weights

    def no_net(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(type(ResNet50_Weights.IMAGENET1K_V2), "get_state_dict", no_net)
    with pytest.raises(WeightsError, match="TORCH_HOME") as e:
        load_weights("imagenet", "resnet50")
    assert "hub/checkpoints" in str(e.value) or "checkpoints" in str(e.value)


def _train(args, capsys):
    with pytest.raises(SystemExit) as e:
        run_job(train_job.main, train_job.get_args_parser(), ["--local", *map(str, args)])
    return e.value.code, capsys.readouterr().err


def test_an_unknown_model_or_timm_missing_is_exit_2_naming_the_fix(tmp_path, capsys, monkeypatch):
    root = _dataset(tmp_path / "ds", n=8)
    out = tmp_path / "r"
    code, err = _train(["--data", root, "--output", out, "--model", "convnext_nosuch", "--weights", "none"], capsys)
    assert code == 2 and "--model convnext_nosuch: not a timm model name" in err and not out.exists(), err
    assert [line.startswith("error:") for line in err.strip().splitlines()] == [True]
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    code, err = _train(["--data", root, "--output", out, "--model", NAME, "--weights", "none"], capsys)
    assert code == 2 and "pip install 'mlc[timm]'" in err and not out.exists(), err


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
    """A timm image+caption run, 2 epochs, then resumed to 3."""
    tmp = tmp_path_factory.mktemp("timm")
    root = _dataset(tmp / "ds", n=24)
    cfg = TrainConfig(data=str(root), output=str(tmp / "run"), inputs="image+caption", model=NAME,
                      **{**FAST, "epochs": 2, "unfrozen_depth": 1})
    mlc.fit(cfg, log=lambda *_: None, progress=False)
    logs: list = []
    mlc.fit(cfg.replace(epochs=3), log=logs.append, progress=False)
    return root, tmp / "run", logs


def test_a_timm_fused_run_resumes_and_warm_starts_an_image_network(fused_run, tmp_path):
    root, run, logs = fused_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]  # the resume went on from epoch 2
    assert json.loads((run / "best" / "meta.json").read_text())["config"]["model"] == NAME
    state = load_weights(str(run), NAME)
    assert any(k.startswith("image.stages.3.") for k in state) and "text.bag.weight" in state
    image = build("image", 2, model=NAME, weights=str(run), log=lambda *_: None)  # --weights RUN: its image branch
    got = image.state_dict()
    assert all(torch.equal(got[k[len("image."):]], v) for k, v in state.items() if k.startswith("image."))
    fused = build("image+caption", 2, model=NAME, num_tokens=state["text.bag.weight"].shape[0], weights=str(run))
    assert torch.equal(fused.state_dict()["text.bag.weight"], state["text.bag.weight"])
    with pytest.raises(WeightsError, match="do not fit"):
        build("image", 2, model="efficientnet_b0", weights=str(run))


def test_prediction_with_flip_is_the_mean_of_each_image_and_its_mirror(fused_run, tmp_path):
    """A timm fused run scored with --tta flip, in process and by a Serve replica, against the network run on
    each image and on its mirror."""
    from mlc.data.transforms import eval_transform, to_model_input
    from mlc.prediction.checkpoints import load_model
    root, run, _ = fused_run
    rng = np.random.default_rng(0)
    from PIL import Image
    test = pd.read_csv(root / "test.csv", keep_default_na=False)
    for i, name in enumerate(test.ImageID):  # asymmetric images, so the mirror differs
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "data" / name)
    logs: list = []
    mlc.predict(str(run), output=str(tmp_path / "flip"), tta="flip", log=logs.append, progress=False)
    mlc.predict(str(run), output=str(tmp_path / "plain"), log=lambda *_: None, progress=False)
    assert any("test-time augmentation flip" in m for m in logs), logs
    assert json.loads((tmp_path / "flip" / "predict_config.json").read_text())["predict"]["tta"] == "flip"
    got = pd.read_csv(tmp_path / "flip" / "probabilities.csv").set_index("ImageID")
    plain = pd.read_csv(tmp_path / "plain" / "probabilities.csv").set_index("ImageID")
    model, vocab, tok = load_model(str(run), with_tokenizer=True)
    t = eval_transform(32)
    for name, caption in zip(test.ImageID, test.Caption):
        x = to_model_input(t(Image.open(root / "data" / name)).unsqueeze(0), torch.device("cpu"))
        ids = torch.tensor(tok.encode(caption) if caption else [], dtype=torch.long)
        with torch.no_grad():
            p = [torch.sigmoid(model(v, ids, torch.tensor([0]))).numpy()[0] for v in (x, torch.flip(x, dims=(3,)))]
        np.testing.assert_allclose(got.loc[name, vocab.labels].to_numpy(float), (p[0] + p[1]) / 2, atol=1e-5)
        np.testing.assert_allclose(plain.loc[name, vocab.labels].to_numpy(float), p[0], atol=1e-5)
    assert not np.allclose(got.to_numpy(), plain.to_numpy(), atol=1e-4)

    import mlc.distributed.predict as ray_predict
    from mlc.distributed.serve import Classifier
    ray_predict.actor_device, was = (lambda: torch.device("cpu")), ray_predict.actor_device  # not in an actor
    try:
        replica = Classifier(str(run), tta="flip")
    finally:
        ray_predict.actor_device = was
    assert replica.identity["tta"] == "flip"
    name, caption = test.ImageID[0], test.Caption[0]
    probs = replica._forward([replica._decode((root / "data" / name).read_bytes(), caption)])[0]
    np.testing.assert_allclose(probs, got.loc[name, vocab.labels].to_numpy(float), atol=2e-6)


def test_flip_averages_probabilities_and_leaves_caption_networks_alone():
    torch.manual_seed(0)
    net = build("image", N, model=NAME, weights="none").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = torch.sigmoid(for_scoring(net, None, "flip")(x))
        want = (torch.sigmoid(net(x)) + torch.sigmoid(net(torch.flip(x, dims=(3,))))) / 2
    torch.testing.assert_close(got, want)
    caption = build("caption", N, num_tokens=5)
    assert type(for_scoring(caption, None, "flip")) is type(caption)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_timm_image_network_exports_and_scores_without_mlc(tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    from test_export import NO_MLC
    from mlc.data.labels import LabelVocab
    from mlc.eval.thresholds import ThresholdChoice
    from mlc.model.checkpoint import save_model
    from mlc.model.resnet import bare_state_dict
    root = _dataset(tmp_path / "ds", n=4)
    torch.manual_seed(0)
    net = build("image", 2, model=NAME, weights="none")
    cfg = TrainConfig(data=str(root), output=str(tmp_path / "run"), weights="none", image_size=32, model=NAME,
                      amp="off", inputs="image", loader_workers=0)
    save_model(str(tmp_path / "run" / "best"), bare_state_dict(net), LabelVocab(["1", "2"]),
               {"config": cfg.to_dict(), "threshold": ThresholdChoice("global_top1", 0.5).to_dict(), "epoch": 1})
    mlc.predict(str(tmp_path / "run"), output=str(tmp_path / "pred"), log=lambda *_: None, progress=False)
    want = pd.read_csv(tmp_path / "pred" / "probabilities.csv").set_index("ImageID")
    r = subprocess.run([sys.executable, "jobs/export.py", "--checkpoint", str(tmp_path / "run"), "--format", fmt,
                        "--output", str(tmp_path / "exported")], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    names = list(want.index)
    r = subprocess.run([sys.executable, "-c", NO_MLC, str(tmp_path / "exported"), str(tmp_path / "p.npy"),
                        *[str(root / "data" / n) for n in names]], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), want.loc[names, ["1", "2"]].to_numpy(float), atol=1e-5)
