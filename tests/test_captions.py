"""Captions: the tokenizer, the caption and fused networks, and --inputs through training and prediction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mlc
from mlc.model import fusion
from mlc.config import TrainConfig
from mlc.errors import DataError
from mlc.data.tokenizer import MAX_WORDS, Tokenizer, empty_captions, words
from mlc.data.transforms import tokens_to_tensors

CPU = torch.device("cpu")


def test_tokenizer_round_trips_through_json_and_encodes_the_same():
    tok = Tokenizer.fit(["A man riding a horse.", "Two dogs on a hot-dog stand", "a man's bike"], buckets=512)
    again = Tokenizer.from_json(json.loads(json.dumps(tok.to_json())))
    assert again == tok and again.size == tok.size == 1 + len(tok.vocab) + 512
    for text in ("a man riding a dog", "zebras!", "", None):
        assert again.encode(text) == tok.encode(text)
    assert tok.vocab == tuple(sorted(tok.vocab)) and "man's" in tok.vocab and "hot" in tok.vocab
    with pytest.raises(ValueError, match="not an mlc tokenizer"):
        Tokenizer.from_json('{"vocab": ["a"]}')


def test_unknown_words_empty_captions_and_long_captions():
    tok = Tokenizer.fit(["a red bus", "a blue car"], buckets=64)
    n_words = len(tok.vocab)
    ids = tok.encode("a purple bus")
    # Word ids come first: "purple" was never seen in training, so it is the unknown id 0.
    assert ids[:3] == [tok.vocab.index("a") + 1, 0, tok.vocab.index("bus") + 1]
    assert all(i > n_words for i in ids[3:])  # bigrams and character trigrams: hash buckets after the words
    assert len(ids) == 3 + 2 + sum(len(w) for w in ("a", "purple", "bus"))  # words, bigrams, trigrams of <w>
    for empty in ("", None, float("nan"), "  ...  "):
        assert tok.encode(empty) == []
    assert empty_captions(["a bus", "", None, "!!"]) == 3
    long = " ".join(["bus"] * (MAX_WORDS + 40))
    assert len(words(long)) == MAX_WORDS
    assert tok.encode(long)[:MAX_WORDS] == [tok.vocab.index("bus") + 1] * MAX_WORDS
    assert tok.encode(long).count(tok.vocab.index("bus") + 1) == MAX_WORDS  # the rest is cut, not encoded


def test_an_empty_caption_is_a_zero_vector_and_the_row_is_predicted_from_the_prior():
    model = fusion.build("caption", 3, num_tokens=50).eval()
    ids, offsets = tokens_to_tensors([[5, 7], [], [9]], CPU)
    assert offsets.tolist() == [0, 2, 2]
    with torch.no_grad():
        feats = model.text(ids, offsets)
        logits = model(ids, offsets)
    assert torch.equal(feats[1], torch.zeros_like(feats[1])) and feats[0].abs().sum() > 0
    assert torch.allclose(logits[1], model.head.bias)  # nothing but the head's bias: the label prior it learnt


def _captions_and_images(n: int, seed: int, informative: str):
    """Two labels. ``informative="caption"``: the words say which (``cat``/``dog``), the images are random
    colours; ``"image"``: the red and blue channels say which, the captions are random filler words."""
    g = np.random.default_rng(seed)
    y = g.integers(0, 2, size=(n, 2)).astype(np.float32)
    filler = ["the", "a", "on", "street", "near", "small", "big", "with", "park", "tree"]
    captions, images = [], np.zeros((n, 3, 8, 8), dtype=np.float32)
    for i in range(n):
        ws = list(g.choice(filler, size=5))
        if informative == "caption":
            ws += ["cat"] * int(y[i, 0]) + ["dog"] * int(y[i, 1])
            g.shuffle(ws)
            images[i] = g.normal(size=(3, 1, 1))  # a random colour
        else:
            images[i] = g.normal(scale=0.1, size=(3, 1, 1))
            images[i, 0] += 2 * y[i, 0] - 1  # red for the first label
            images[i, 2] += 2 * y[i, 1] - 1  # blue for the second
        captions.append(" ".join(ws))
    return captions, torch.from_numpy(images).contiguous(memory_format=torch.channels_last), torch.from_numpy(y)


@pytest.mark.parametrize("informative", ["caption", "image"])
def test_the_fused_network_learns_from_whichever_input_carries_the_label(informative):
    torch.manual_seed(0)
    train_caps, train_x, train_y = _captions_and_images(64, 0, informative)
    test_caps, test_x, test_y = _captions_and_images(64, 1, informative)
    tok = Tokenizer.fit(train_caps, buckets=256)
    model = fusion.build("image+caption", 2, num_tokens=tok.size)
    # A small stand-in for the ResNet50 with the same output (2048 pooled features), so that this tests the
    # fusion (caption encoder, concatenation, head) in seconds; the runs below train the real one.
    model.image = torch.nn.Sequential(torch.nn.Conv2d(3, 2048, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                      torch.nn.Flatten())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)  # high: 40 steps stand in for the thousands of a run
    for step in range(40):
        rows = torch.randint(0, 64, (16,))
        ids, off = tokens_to_tensors([tok.encode(train_caps[i]) for i in rows], CPU)
        loss = F.binary_cross_entropy_with_logits(model(train_x[rows], ids, off), train_y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        ids, off = tokens_to_tensors(tok.encode_many(test_caps), CPU)
        accuracy = ((model(test_x, ids, off) > 0).float() == test_y).float().mean().item()
    # Held-out rows of the same kind: chance is 0.5.
    assert accuracy >= 0.9, (informative, accuracy)


def _dataset(root: Path, n: int = 24, images: bool = True, test_captions: bool = True) -> Path:
    """Two labels said by the captions (red/blue); images in two colours when ``images``."""
    rows = []
    if images:
        (root / "data").mkdir(parents=True)
    else:
        root.mkdir(parents=True)
    for i in range(n + 6):
        label = "1" if i % 2 else "2"
        colour = "red" if label == "1" else "blue"
        if images:
            rgb = (200, 20, 20) if label == "1" else (20, 20, 200)
            Image.fromarray(np.full((40, 40, 3), rgb, dtype=np.uint8)).save(root / "data" / f"{i}.jpg")
        rows.append((f"{i}.jpg", label, f"a {colour} thing number {i}"))
    (root / "train.csv").write_text("ImageID,Labels,Caption\n" + "".join(f'{a},{b},"{c}"\n' for a, b, c in rows[:n]))
    test = rows[n:]
    if test_captions:
        # One test row without a caption: it must still get a prediction.
        (root / "test.csv").write_text("ImageID,Caption\n" + "".join(
            f'{a},"{c if k else ""}"\n' for k, (a, _, c) in enumerate(test)))
    else:
        (root / "test.csv").write_text("ImageID\n" + "".join(f"{a}\n" for a, _, _ in test))
    return root


# bce: asl (the default) spares easy negatives, and these runs take 6 steps
FAST = dict(weights="none", image_size=32, epochs=3, batch_size=8, unfrozen_depth=0, amp="off", loader_workers=0,
            val_fraction=0.25, lr=0.05, warmup_epochs=0.0, loss="bce")


def test_caption_only_never_opens_an_image_and_predicts_from_its_checkpoint_alone(tmp_path):
    root = _dataset(tmp_path / "ds", images=False)  # no image folder at all
    out = tmp_path / "run"
    logs: list = []
    summary = mlc.fit(TrainConfig(data=str(root), output=str(out), inputs="caption", **FAST), log=logs.append,
                      progress=False)
    assert summary["best"]["f1_samples"] == 1.0  # the captions name the label
    meta = json.loads((out / "best" / "meta.json").read_text())
    assert meta["config"]["inputs"] == "caption" and (out / "best" / "tokenizer.json").exists()
    assert any("rows without a caption: 0 of 24 labelled, 1 of 6 test" in m for m in logs), logs
    # 18 training rows in batches of 8 for 3 epochs: 6 steps, so the embedding learns at the capped multiple.
    assert any("caption embedding learning rate 1.5 (30 x --lr over 6 steps)" in m for m in logs), logs
    first = mlc.read_table(str(out / "predictions.csv"))
    assert len(first) == 6 and all(first.Labels[k] == ["2" if k % 2 == 0 else "1"] for k in range(1, 6))

    again_logs: list = []
    mlc.predict(str(out), output=str(tmp_path / "again"), log=again_logs.append, progress=False)
    assert mlc.read_table(str(tmp_path / "again" / "predictions.csv")).Labels.tolist() == first.Labels.tolist()
    assert any("1 of 6 rows to predict have no caption" in m for m in again_logs), again_logs
    # load_model rebuilds the same function: its scores of the test captions are the written probabilities.
    model, vocab, tok = mlc.load_model(str(out / "best" / "model.pt"), with_tokenizer=True)
    test = mlc.read_table(str(root / "test.csv"))
    ids, off = tokens_to_tensors(tok.encode_many(test.Caption), CPU)
    with torch.no_grad():
        probs = torch.sigmoid(model(ids, off)).numpy()
    written = pd.read_csv(out / "probabilities.csv")
    assert written.ImageID.tolist() == test.ImageID.tolist()
    assert np.allclose(written[vocab.labels].to_numpy(), probs, atol=1e-3)  # bf16 scoring, 6 decimals written


def test_image_and_caption_train_resume_and_predict_a_table_without_captions(tmp_path):
    root = _dataset(tmp_path / "ds")
    out = tmp_path / "run"
    cfg = TrainConfig(data=str(root), output=str(out), **{**FAST, "epochs": 1})  # inputs auto
    mlc.fit(cfg, progress=False, log=lambda *_: None)
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["config"]["inputs"] == "image+caption" and state["tokenizer"]["vocab"]
    assert any(k.startswith("text.") for k in state["model"]) and any(k.startswith("image.") for k in state["model"])
    # Resume to a second epoch with the saved tokenizer: same settings, auto resolves the same way.
    logs: list = []
    summary = mlc.fit(cfg.replace(epochs=2), progress=False, log=logs.append)
    assert any("training continues at epoch 2" in m for m in logs) and len(json.loads(
        (out / "metrics.json").read_text())["epochs"]) == 2
    assert summary["test"]["rows"] == 6

    bare = _dataset(tmp_path / "bare", test_captions=False)
    pred_logs: list = []
    pred = mlc.predict(str(out), output=str(tmp_path / "p"), data=str(bare), log=pred_logs.append, progress=False)
    assert pred["rows"] == 6 and any("no Caption column" in m for m in pred_logs), pred_logs
    assert len(mlc.read_table(str(tmp_path / "p" / "predictions.csv"))) == 6


def test_inputs_auto_follows_the_table_and_a_caption_network_needs_captions(tmp_path):
    from mlc.data.run_data import resolve_inputs
    import pandas as pd
    with_caps = pd.DataFrame({"ImageID": ["a", "b"], "Labels": [["1"], ["2"]], "Caption": ["x", ""]})
    empty = with_caps.assign(Caption=["", None])
    no_col = with_caps.drop(columns="Caption")
    assert resolve_inputs("auto", with_caps, "t.csv") == "image+caption"
    assert resolve_inputs("auto", empty, "t.csv") == resolve_inputs("auto", no_col, "t.csv") == "image"
    assert resolve_inputs("image", with_caps, "t.csv") == "image"
    for table in (empty, no_col):
        with pytest.raises(DataError, match="t.csv has no captions"):
            resolve_inputs("caption", table, "t.csv")
    with pytest.raises(ValueError, match="--inputs must be"):
        TrainConfig(inputs="text")


def test_the_inputs_comparison_runs_every_row_on_one_split(tmp_path):
    from mlc.bench.inputs import compare, markdown
    root = _dataset(tmp_path / "ds", n=30)
    (root / "data" / "0.jpg").unlink()  # one labelled row without its image: left out of the image rows only
    # images= relative to the data root, as a user gives it
    table = compare(str(root), str(tmp_path / "cmp"), images="data", caption_epochs=2, image_epochs=1,
                    image_size=32, log=lambda *_: None)
    assert table.inputs.tolist() == ["linear baseline (captions)", "caption", "linear baseline (captions)",
                                     "image", "caption", "image+caption"]
    assert table.rows.tolist() == [30, 30, 29, 29, 29, 29]
    # The captions name the label: the baseline and the caption network are perfect on either row set.
    assert table.f1_samples[[0, 1, 2, 4]].tolist() == [1.0] * 4
    assert (tmp_path / "cmp" / "compare.csv").is_file() and markdown(table).count("\n") == 7
    assert json.loads((tmp_path / "cmp" / "subset_image_caption" / "best" / "meta.json").read_text())[
        "config"]["inputs"] == "image+caption"


def test_a_checkpoint_from_before_inputs_resumes_as_the_image_network_it_is():
    from mlc.data.labels import LabelVocab
    from mlc.model.checkpoint import ConfigMismatch, check_resumable
    old = TrainConfig(data="/d").to_dict()
    old.pop("inputs")  # written by an mlc without --inputs
    from mlc.migrate import migrate
    state = migrate({"model": {}, "config": old, "labels": ["1", "2"]})  # as mlc.model.checkpoint reads it
    check_resumable(state, TrainConfig(data="/d", inputs="image"), LabelVocab(["1", "2"]), "ckpt")
    with pytest.raises(ConfigMismatch, match="inputs: 'image' -> 'image\\+caption'"):
        check_resumable(state, TrainConfig(data="/d", inputs="image+caption"), LabelVocab(["1", "2"]), "ckpt")


def test_the_caption_embedding_has_its_own_learning_rate_and_no_weight_decay():
    from mlc.model.resnet import trainable_parameter_groups
    model = fusion.build("image+caption", 3, num_tokens=40, unfrozen_depth=1)
    groups = trainable_parameter_groups(model, 0.01, text_lr=0.05)
    text = groups[-1]
    assert [p.shape for p in text["params"]] == [model.text.bag.weight.shape]
    assert text["lr"] == 0.05 and text["weight_decay"] == 0.0
    assert any(p is model.head.weight for p in groups[0]["params"])  # the head decays, at --lr
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_the_caption_embedding_learning_rate_follows_the_number_of_steps():
    # The same total movement on a short run: 500 steps (2,008 real rows) learn at 8x --lr, 7,500 steps (all
    # 30,000) at 1x, where the measured optimum was (docs/measurements.md); never below 1x, never above the cap.
    assert fusion.text_lr_scale(500) == pytest.approx(8.0)
    assert fusion.text_lr_scale(7500) == fusion.text_lr_scale(10**6) == 1.0
    assert fusion.text_lr_scale(1) == fusion.text_lr_scale(0) == fusion.TEXT_LR_MAX_SCALE
    steps = [1, 10, 100, 400, 1000, 4000, 8000]
    scales = [fusion.text_lr_scale(n) for n in steps]
    assert scales == sorted(scales, reverse=True)


def test_best_gets_the_tokenizer_of_the_checkpoint_it_publishes_and_loses_a_stale_one(tmp_path):
    from mlc.train.run_folder import BEST_FILES, publish_best
    for epoch, files in ((1, BEST_FILES + ("tokenizer.json",)), (2, BEST_FILES)):
        d = tmp_path / "run" / f"epoch_{epoch:04d}"
        d.mkdir(parents=True)
        for n in files:
            (d / n).write_text(f"{n} of epoch {epoch}")
    best = tmp_path / "run" / "best"
    publish_best(str(tmp_path / "run"), 1, str(best))
    assert (best / "tokenizer.json").read_text() == "tokenizer.json of epoch 1"
    publish_best(str(tmp_path / "run"), 2, str(best))  # e.g. a sweep whose best trial is now image-only
    assert not (best / "tokenizer.json").exists() and (best / "meta.json").read_text() == "meta.json of epoch 2"


def test_the_blank_row_of_an_empty_rank_batch_fits_each_network():
    """A rank with no usable row steps on one blank row (mlc.train.engine): its shape must fit what the network reads."""
    from mlc.data.batch import Reads
    caption = fusion.build("caption", 3, num_tokens=20).eval()
    (b_ids, b_off) = Reads(images=False, captions=True, side=32).blank(CPU)
    assert b_ids.numel() == 0 and b_off.tolist() == [0] and caption(b_ids, b_off).shape == (1, 3)
    x, b_ids, b_off = Reads(images=True, captions=True, side=32).blank(CPU)
    assert x.shape == (1, 3, 32, 32) and b_off.tolist() == [0]
    both = fusion.build("image+caption", 3, num_tokens=20, unfrozen_depth=1).eval()
    assert both(x, b_ids, b_off).shape == (1, 3)
    (x,) = Reads(images=True, captions=False, side=48).blank(CPU)
    assert x.shape == (1, 3, 48, 48)
