"""Export (jobs/export.py: TorchScript, ONNX): the file and model.json's recipe alone, in a process without mlc,
give mlc's scores and labels; the recipe prepares every kind of image exactly as mlc does."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mlc.config import TrainConfig
from mlc.data.labels import LabelVocab
from mlc.eval.thresholds import ThresholdChoice
from mlc.model.checkpoint import save_model
from mlc.model.resnet import bare_state_dict
from serve_helpers import LABELS, REPO, SIZE, make_model


@pytest.fixture(scope="module")
def model(real_data, tmp_path_factory):
    if not (real_data / "images").is_dir():
        pytest.skip(f"no images in {real_data}")
    return make_model(real_data, tmp_path_factory.mktemp("export"))


# Prepares the images by model.json's recipe and scores them with plain torch or onnxruntime, in a process where
# mlc cannot be imported.
NO_MLC = """
import json, sys
import numpy as np
sys.modules["mlc"] = None  # any import of mlc now fails: the file and model.json must stand alone
folder, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
meta = json.load(open(folder + "/model.json"))
prep = meta["input"]["preprocess"]
recipe = {}
exec(prep["recipe"], recipe)
x = np.stack([recipe["preprocess"](p, prep["resize"], prep["size"]) for p in paths])
if meta["format"] == "torchscript":
    import torch
    probs = torch.jit.load(folder + "/" + meta["file"]).eval()(torch.from_numpy(x)).detach().numpy()
else:
    import onnxruntime
    session = onnxruntime.InferenceSession(folder + "/" + meta["file"])
    probs = session.run(["probabilities"], {"images": x})[0]
np.save(out, probs)
"""


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_an_exported_model_scores_real_images_as_mlc_does_by_its_recipe_alone(model, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    from mlc.eval.thresholds import apply_threshold
    r = subprocess.run([sys.executable, "jobs/export.py", "--checkpoint", str(model["run"] / "best" / "model.pt"),
                        "--format", fmt, "--output", str(tmp_path / "exported")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "exported" / "model.json").read_text())
    assert meta["labels"] == LABELS and meta["input"]["shape"] == ["N", 3, SIZE, SIZE]
    paths = [str(model["root"] / "imgs" / n) for n in model["names"]]
    r = subprocess.run([sys.executable, "-c", NO_MLC, str(tmp_path / "exported"), str(tmp_path / "p.npy"), *paths],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    probs = np.load(tmp_path / "p.npy")
    want = model["probs"].loc[model["names"], LABELS].to_numpy(dtype=float)
    np.testing.assert_allclose(probs, want, atol=1e-5)
    keep = apply_threshold(probs, meta["threshold"]["strategy"], meta["threshold"]["value"])
    labels = [" ".join(lab for lab, k in zip(LABELS, row) if k) for row in keep]
    assert labels == model["labels"].loc[model["names"], "Labels"].tolist()


def _saved(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def test_the_recipe_prepares_every_kind_of_image_as_mlc_does(tmp_path):
    """Pixel for pixel: JPEGs big enough for libjpeg's reduced scale, portrait and landscape, grey, CMYK,
    transparency (RGBA, a palette's transparent index), 16-bit grey and float images."""
    from mlc.data.transforms import eval_transform
    from mlc.io.images import decode_image
    from mlc.prediction.export import RECIPE
    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((333, 517, 3)) * 255).astype(np.uint8))
    palette = rgb.convert("P", palette=Image.ADAPTIVE)
    palette.info["transparency"] = 3
    files = {"landscape.jpg": _saved(rgb, "JPEG"), "portrait.jpg": _saved(rgb.transpose(Image.ROTATE_90), "JPEG"),
             "grey.jpg": _saved(rgb.convert("L"), "JPEG"), "cmyk.jpg": _saved(rgb.convert("CMYK"), "JPEG"),
             "rgba.png": _saved(rgb.convert("RGBA").rotate(20), "PNG"), "palette.png": _saved(palette, "PNG"),
             "grey16.png": _saved(Image.fromarray((rng.random((90, 70)) * 65535).astype(np.uint16)), "PNG"),
             "float.tif": _saved(Image.fromarray(rng.random((80, 60)).astype(np.float32)), "TIFF")}
    recipe: dict = {}
    exec(RECIPE, recipe)
    for size in (64, 224):
        tf = eval_transform(size)
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
            want = tf(decode_image(data, name, draft=tf.draft)).numpy()
            got = recipe["preprocess"](str(tmp_path / name), tf.draft, size)
            assert got.dtype == np.uint8 and got.shape == (3, size, size), name
            np.testing.assert_array_equal(got, want, err_msg=f"{name} at {size} px")


def test_the_tokenizer_recipe_encodes_the_real_captions_as_mlc_does(real_train, real_test):
    """model.json's plain-Python tokenizer against mlc's, on every real caption (train and test: words outside
    the vocabulary too)."""
    from mlc.data.tokenizer import Tokenizer
    from mlc.prediction.export_captions import TOKENIZER_RECIPE
    tok = Tokenizer.fit(real_train.Caption[:20000])
    recipe: dict = {}
    exec(TOKENIZER_RECIPE, recipe)
    encode = recipe["make_encoder"](json.loads(json.dumps(tok.to_dict())))
    captions = [*real_train.Caption, *real_test.Caption, None, "", "A MAN'S dog... 42"]
    assert [encode(c) for c in captions] == [tok.encode(c) for c in captions]
    ids, offsets = recipe["batch"](encode, ["a dog", "", "two dogs"])
    assert offsets == [0, len(encode("a dog")), len(encode("a dog"))] and len(ids) == offsets[2] + len(encode("two dogs"))


# As NO_MLC, for a network that reads captions: model.json's tokenizer recipe turns them into the graph's ids.
NO_MLC_CAPTIONS = """
import json, sys
import numpy as np
sys.modules["mlc"] = None
folder, out, table = sys.argv[1], sys.argv[2], sys.argv[3]
meta = json.load(open(folder + "/model.json"))
rows = json.load(open(table))
cap = meta["input"]["captions"]
tokenizing = {}
exec(cap["recipe"], tokenizing)
ids, offsets = tokenizing["batch"](tokenizing["make_encoder"](cap["tokenizer"]), [r["caption"] for r in rows])
feed = {"token_ids": np.array(ids, dtype=np.int64), "offsets": np.array(offsets, dtype=np.int64)}
if "images" in meta["inputs"]:
    prep = meta["input"]["preprocess"]
    recipe = {}
    exec(prep["recipe"], recipe)
    feed["images"] = np.stack([recipe["preprocess"](r["path"], prep["resize"], prep["size"]) for r in rows])
args = [feed[n] for n in meta["inputs"]]
if meta["format"] == "torchscript":
    import torch
    probs = torch.jit.load(folder + "/" + meta["file"]).eval()(*map(torch.from_numpy, args)).detach().numpy()
else:
    import onnxruntime
    session = onnxruntime.InferenceSession(folder + "/" + meta["file"])
    probs = session.run(["probabilities"], dict(zip(meta["inputs"], args)))[0]
np.save(out, probs)
"""


@pytest.mark.parametrize("inputs", ["image+caption", "caption"])
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_network_that_reads_captions_exports_and_scores_without_mlc(model, tmp_path, fmt, inputs):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    import pandas as pd
    import torch
    from mlc.data.tokenizer import Tokenizer
    from mlc.model.fusion import build
    root, names = model["root"], model["names"][:6]
    captions = ["a man riding a horse", "two dogs on a beach", "", "a red bus in the street", "dogs and a man",
                "a horse and a bus near the beach at night"]
    tok = Tokenizer.fit(captions[:4])  # the last two hold words outside the vocabulary
    torch.manual_seed(2)
    net = build(inputs, len(LABELS), num_tokens=tok.size, unfrozen_depth=1, weights="none", log=lambda *_: None)
    with torch.no_grad():
        net.text.bag.weight.mul_(50)  # so the captions move the scores well beyond the tolerance
    cfg = TrainConfig(data=str(root), images="imgs", output=str(tmp_path / "run"), weights="none", image_size=SIZE,
                      unfrozen_depth=1, dropout=0.0, amp="off", inputs=inputs, loader_workers=0)
    save_model(str(tmp_path / "run" / "best"), bare_state_dict(net), LabelVocab(LABELS),
               {"config": cfg.to_dict(), "threshold": ThresholdChoice("global_top1", 0.5).to_dict(), "epoch": 1,
                "tokenizer": tok.to_dict()})
    table = tmp_path / "test.csv"
    table.write_text("ImageID,Caption\n" + "".join(f'{n},"{c}"\n' for n, c in zip(names, captions)))
    import mlc
    mlc.predict(str(tmp_path / "run"), str(root), str(tmp_path / "pred"), ids_csv=str(table), log=lambda *_: None,
                progress=False)
    want = pd.read_csv(tmp_path / "pred" / "probabilities.csv").set_index("ImageID").loc[names, LABELS]
    r = subprocess.run([sys.executable, "jobs/export.py", "--checkpoint", str(tmp_path / "run"), "--format", fmt,
                        "--output", str(tmp_path / "exported")], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "exported" / "model.json").read_text())
    assert meta["inputs"] == (["images"] if inputs != "caption" else []) + ["token_ids", "offsets"]
    assert meta["input"]["captions"]["tokenizer"] == tok.to_dict()
    rows = [{"path": str(root / "imgs" / n), "caption": c} for n, c in zip(names, captions)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    r = subprocess.run([sys.executable, "-c", NO_MLC_CAPTIONS, str(tmp_path / "exported"), str(tmp_path / "p.npy"),
                        str(tmp_path / "rows.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), want.to_numpy(dtype=float), atol=1e-5)
    assert want.to_numpy().std(axis=0).max() > 1e-3  # the rows' scores differ: the captions count
