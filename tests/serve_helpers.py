"""What the serving and export tests share: a small checkpoint of a random network, real images, and mlc's own
predictions of them to compare with (tests/test_serve.py, tests/test_export.py)."""

from __future__ import annotations

import io
import os
import shutil
import uuid
from pathlib import Path

import pandas as pd
import torch

from mlc.config import TrainConfig
from mlc.data.labels import LabelVocab
from mlc.eval.thresholds import ThresholdChoice
from mlc.model.checkpoint import save_model
from mlc.model.resnet import bare_state_dict, build_model

REPO = Path(__file__).resolve().parents[1]
LABELS = ["1", "3", "7", "19"]
SIZE = 64
MAX_PIXELS = 200_000  # small, so a test can send an image over it


def make_model(real_data: Path, root: Path) -> dict:
    """A random network's checkpoint (fp32, 64 px) in ``root``, 12 real images and mlc's in-process predictions
    of them."""
    (root / "imgs").mkdir()
    names = sorted(os.listdir(real_data / "images"), key=lambda s: int(s.split(".")[0]))[:12]
    for n in names:
        shutil.copy(real_data / "images" / n, root / "imgs" / n)
    (root / "test.csv").write_text("ImageID\n" + "".join(f"{n}\n" for n in names))
    torch.manual_seed(0)
    net = build_model(len(LABELS), unfrozen_depth=1, dropout=0.0, weights="none")
    with torch.no_grad():
        net.fc.weight.mul_(0.01)
    cfg = TrainConfig(data=str(root), images="imgs", output=str(root / "run"), weights="none", image_size=SIZE,
                      unfrozen_depth=1, dropout=0.0, amp="off", loader_workers=0, inputs="image",
                      max_image_pixels=MAX_PIXELS)
    save_model(str(root / "run" / "best"), bare_state_dict(net), LabelVocab(LABELS),
               {"config": cfg.to_dict(), "threshold": ThresholdChoice("global_top1", 0.5).to_dict(), "epoch": 3})
    import mlc
    mlc.predict(str(root / "run"), str(root), str(root / "pred"), batch_size=5, log=lambda *_: None, progress=False)
    probs = pd.read_csv(root / "pred" / "probabilities.csv").set_index("ImageID")
    labels = pd.read_csv(root / "pred" / "predictions.csv", keep_default_na=False).set_index("ImageID")
    return {"root": root, "run": root / "run", "names": names, "probs": probs, "labels": labels}


def image(model: dict, i: int) -> bytes:
    return (model["root"] / "imgs" / model["names"][i]).read_bytes()


def multipart(fields: dict) -> tuple[bytes, str]:
    """A multipart/form-data body of ``{name: (bytes, filename or None)}`` and its Content-Type."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, (value, filename) in fields.items():
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"".encode())
        if filename:
            out.write(f"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream".encode())
        out.write(b"\r\n\r\n" + value + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"
