"""A trained model as a file that scores images without mlc: TorchScript (plain torch) or ONNX (onnxruntime).

The exported graph takes what any image library gives: uint8 RGB images, ``(N, 3, S, S)``, prepared as
``model.json``'s recipe says, and returns each label's probability ``(N, C)``; the ImageNet normalisation and
the sigmoid are inside. Beside it, ``model.json`` holds the label list, the run's threshold (strategy and
value) with the rule that applies it, the preprocessing as a recipe (:data:`RECIPE`: Python with PIL and numpy
only, which tests/test_export.py runs without mlc and checks pixel for pixel against mlc's own decoding and
evaluation transform) and the checkpoint's identity (its sha256), so a deployment without mlc predicts what
jobs/predict.py predicts. A network that reads captions takes them as token ids, with the tokenizer and its
plain-Python recipe in ``model.json`` (:mod:`mlc.prediction.export_captions`).
"""

from __future__ import annotations

import io
import json
import warnings

import torch
from torch import nn

from mlc.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from mlc.errors import UsageError
from mlc.io import storage
from mlc.model.fusion import build
from mlc.model.checkpoint import model_folder
from mlc.prediction.checkpoints import load_predictor
from mlc.prediction.export_captions import caption_graph, described_captions

FORMATS = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}

# How each threshold strategy turns one image's probabilities p (one per label) into its labels (mirrors
# mlc.eval.thresholds.apply_threshold, which the export test checks against).
RULES = {
    "percentile": "keep the labels whose probability is >= numpy.percentile(p, value) (linear interpolation); "
                  "ties at the cut are all kept",
    "global": "keep the labels whose probability is >= value",
    "global_top1": "keep the labels whose probability is >= value, and the label(s) with the highest probability",
    "per_class": "keep label i when its probability is >= value[i]",
}


# mlc's evaluation preprocessing (mlc.io.images.decode_image, then mlc.data.transforms.eval_transform), written
# out with PIL and numpy alone for model.json: JPEGs decoded at libjpeg's reduced scale, transparency over
# white, >8-bit grey rescaled, and the centre crop taken by one resize of its box (not a resize, then a crop:
# that differs by up to 4e-4 in the scores).
RECIPE = '''\
def preprocess(path, resize, size):
    """One image file -> uint8 array (3, size, size), RGB, as mlc prepares it for scoring."""
    import numpy as np
    from PIL import Image
    im = Image.open(path)  # the first frame of a multi-frame file; EXIF orientation is not applied
    if im.format == "JPEG":
        im.draft(None, (resize, resize))  # libjpeg scales by 1/2, 1/4 or 1/8 while both sides stay >= resize
    im.load()
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    elif im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        peak = float(a.max()) if a.size else 0.0
        a = a * (255.0 / 65535.0) if peak > 255 else a * 255.0 if im.mode == "F" and peak <= 1.0 else a
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    elif im.mode != "RGB":
        im = im.convert("RGB")
    w, h = im.size
    nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))  # Python's round: halves to even
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, min(w, (left + size) * sx), min(h, (top + size) * sy))
    im = im.resize((size, size), Image.BILINEAR, box=box)  # the crop's box, resized once
    return np.asarray(im).transpose(2, 0, 1)
'''


class Exported(nn.Module):
    """uint8 images (N, 3, S, S) -> probabilities (N, C): normalisation, the network and the sigmoid."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model((images.float() - self.mean) * self.inv_std))


def export(checkpoint: str, output: str, fmt: str, log=print) -> dict:
    """Write ``<output>/model.torchscript.pt`` or ``<output>/model.onnx`` and ``<output>/model.json``."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    folder = model_folder(checkpoint)
    state, vocab, cfg, choice, tokenizer, meta = load_predictor(folder, with_meta=True)
    storage.check_writable(output)
    model = build(cfg.inputs, len(vocab), model=cfg.model, num_tokens=tokenizer.size if tokenizer else 0,
                  unfrozen_depth=cfg.unfrozen_depth, dropout=cfg.dropout, weights=state, freeze_bn=cfg.freeze_bn,
                  log=lambda *_: None).eval()
    size = cfg.image_size
    wrapped, example, names = _graph(model, cfg.inputs, size, captions=tokenizer is not None)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # torch >= 2.10 marks TorchScript deprecated in favour of torch.export; TorchScript is what every torch a
        # user may run (2.4 on) loads with torch.jit.load, so it stays the plain-torch format here.
        warnings.simplefilter("ignore", FutureWarning)
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(wrapped, example), buf)
        else:
            _onnx(wrapped, example, names, buf)
    name = FORMATS[fmt]
    storage.write_bytes(storage.join(output, name), buf.getvalue())
    described = {
        "format": fmt, "file": name,
        "inputs": names,
        "input": {**({"name": "images", "dtype": "uint8", "shape": ["N", 3, size, size], "channels": "RGB",
                      "preprocess": {"resize": eval_transform(size).draft, "size": size,
                                     "how": "preprocess(path, resize, size) in `recipe` (PIL and numpy): decode (a "
                                            "JPEG at libjpeg's reduced scale), to RGB, then the centre crop as one "
                                            "bilinear resize of its box", "recipe": RECIPE}}
                     if "images" in names else {}),
                  **({"captions": described_captions(tokenizer)} if tokenizer else {})},
        "output": {"name": "probabilities", "shape": ["N", len(vocab)], "labels": "the `labels` list, in order"},
        "labels": vocab.labels,
        "threshold": {**choice.to_dict(), "rule": RULES[choice.strategy]},
        "checkpoint": {"source": checkpoint, "epoch": meta.get("epoch"), "sha256": meta.get("model_sha256")},
    }
    storage.write_text(storage.join(output, "model.json"), json.dumps(described, indent=1))
    log(f"wrote {storage.join(output, name)} and model.json ({len(vocab)} labels, {size}px, threshold "
        f"{choice.strategy})")
    return described


def _graph(model: nn.Module, inputs: str, size: int, *, captions: bool) -> tuple[nn.Module, tuple, list]:
    """(the module to export, example inputs to trace it with, its input names)."""
    if captions:
        return caption_graph(model, inputs, size)
    return Exported(model).eval(), (torch.zeros(2, 3, size, size, dtype=torch.uint8),), ["images"]


def _onnx(wrapped: nn.Module, example: tuple, names: list, buf: io.BytesIO) -> None:
    try:
        import onnx  # noqa: F401 - torch's exporter needs it; say so instead of failing deep inside torch
    except ImportError:
        raise UsageError("--format onnx needs the onnx package: pip install -e '.[export]'") from None
    # The TorchScript-based exporter: one pass over a traced graph, no extra dependency beyond onnx, and a batch
    # dimension that stays dynamic.
    # (token_ids: every row's ids, so its own length)
    axes = {"images": {0: "batch"}, "token_ids": {0: "tokens"}, "offsets": {0: "batch"}, "probabilities": {0: "batch"}}
    torch.onnx.export(wrapped, example, buf, input_names=names, output_names=["probabilities"],
                      dynamic_axes={k: v for k, v in axes.items() if k in names or k == "probabilities"},
                      opset_version=17,
                      dynamo=False)
