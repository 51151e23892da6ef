"""Serving (jobs/serve.py on Ray Serve, over real HTTP) and export (TorchScript, ONNX) against mlc's own scores."""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mlc.config import TrainConfig
from mlc.data.labels import LabelVocab
from mlc.eval.thresholds import ThresholdChoice
from mlc.model.resnet import bare_state_dict, build_model
from mlc.model.checkpoint import save_model

os.environ.setdefault("RAY_AUTH_MODE", "token")
REPO = Path(__file__).resolve().parents[1]
LABELS = ["1", "3", "7", "19"]
SIZE = 64
MAX_PIXELS = 200_000  # small, so a test can send an image over it


@pytest.fixture(scope="module")
def model(real_data, tmp_path_factory):
    """A random network's checkpoint (fp32, 64 px), 12 real images and mlc's in-process predictions of them."""
    if not (real_data / "images").is_dir():
        pytest.skip(f"no images in {real_data}")
    root = tmp_path_factory.mktemp("serve")
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


def _request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def _multipart(fields: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, (value, filename) in fields.items():
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"".encode())
        if filename:
            out.write(f"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream".encode())
        out.write(b"\r\n\r\n" + value + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def _serve_ctl(address: str, code: str, timeout: float = 120) -> str:
    """Run ``code`` in a driver connected to the test cluster (the pytest process never becomes one)."""
    script = "import ray\nfrom ray import serve\nray.init(address=%r, log_to_driver=False)\n" % address + code
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def served(model, ray_head):
    """jobs/serve.py deployed on the test cluster: 2 replicas, batches of up to 8 that wait 200 ms to fill."""
    from ray_head import free_port
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ray_head.address}
    r = subprocess.run([sys.executable, "jobs/serve.py", "--checkpoint", str(model["run"]), "--port", str(port),
                        "--min-replicas", "2", "--max-batch-size", "8", "--batch-wait-ms", "200",
                        "--max-body-mb", "1", "--cpus-per-replica", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"http://127.0.0.1:{port}/predict" in r.stdout
    yield {"port": port, "address": ray_head.address}
    _serve_ctl(ray_head.address, "serve.shutdown()\n")


def _image(model, i: int) -> bytes:
    return (model["root"] / "imgs" / model["names"][i]).read_bytes()


def _check_answer(model, i: int, answer: dict) -> None:
    name = model["names"][i]
    want = model["probs"].loc[name]
    got = np.array([answer["scores"][lab] for lab in LABELS])
    np.testing.assert_allclose(got, want[LABELS].to_numpy(dtype=float), atol=2e-6)
    assert " ".join(answer["labels"]) == model["labels"].loc[name, "Labels"]


def test_served_scores_equal_the_predict_jobs(model, served):
    port = served["port"]
    for i in range(3):
        status, answer = _request(port, "POST", "/predict", _image(model, i))
        assert status == 200, answer
        _check_answer(model, i, answer)
        assert answer["model"]["epoch"] == 3 and len(answer["model"]["sha256"]) == 64
    body, ctype = _multipart({"image": (_image(model, 3), "x.jpg")})
    status, answer = _request(port, "POST", "/predict", body, {"Content-Type": ctype})
    assert status == 200, answer
    _check_answer(model, 3, answer)
    status, info = _request(port, "GET", "/labels")
    assert status == 200 and info["labels"] == LABELS and info["threshold"]["strategy"] == "global_top1"
    status, health = _request(port, "GET", "/healthz")
    assert status == 200 and health["status"] == "ok" and health["model"]["checkpoint"] == str(model["run"])


def test_concurrent_clients_get_their_own_answers_in_batches(model, served):
    port = served["port"]
    jobs = [i % len(model["names"]) for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda i: _request(port, "POST", "/predict", _image(model, i)), jobs))
    for i, (status, answer) in zip(jobs, answers):
        assert status == 200, answer
        _check_answer(model, i, answer)
    sizes = [a["batch_size"] for _, a in answers]
    assert max(sizes) > 1, sizes  # requests really were scored together


def test_bad_requests_get_a_4xx_that_says_why_and_the_replicas_go_on(model, served):
    port = served["port"]
    big = io.BytesIO()
    Image.new("RGB", (500, 500), (1, 2, 3)).save(big, "PNG")  # 250,000 pixels > MAX_PIXELS
    body, ctype = _multipart({"image": (_image(model, 0), "x.jpg"), "caption": (b"a dog", None)})
    cases = [
        (("POST", "/predict", b"<html>403 Forbidden</html>"), 415, "looks like an HTML page"),
        (("POST", "/predict", b""), 400, "no image"),
        (("POST", "/predict", big.getvalue()), 413, "pixels"),
        (("POST", "/predict", b"x" * (2 * 2**20)), 413, "at most 1048576"),
        (("POST", "/predict", _image(model, 0)[:200]), 422, "corrupt image"),
        (("POST", "/predict", body, {"Content-Type": ctype}), 400, "reads images only"),
        (("POST", "/predict", b"--nope\r\n", {"Content-Type": "multipart/form-data; boundary=zzz"}), 400, "multipart"),
        (("GET", "/predict"), 405, "POST"),
        (("GET", "/nowhere"), 404, "no route"),
    ]
    for args, status, words in cases:
        got, answer = _request(port, *args)
        assert got == status and words in answer["error"], (args[:2], got, answer)
    status, health = _request(port, "GET", "/healthz")
    assert status == 200


def test_a_killed_replica_is_replaced_and_the_endpoint_keeps_answering(model, served):
    port = served["port"]
    killed = _serve_ctl(served["address"], (
        "names = [a['name'] for a in ray.util.list_named_actors(all_namespaces=True)"
        " if 'SERVE_REPLICA' in a['name'] and 'Classifier' in a['name']]\n"
        "assert len(names) == 2, names\n"
        "ray.kill(ray.get_actor(names[0], namespace='serve'), no_restart=True)\nprint(names[0])\n")).strip()
    statuses = []
    deadline = time.time() + 60
    while statuses.count(200) < 10 and time.time() < deadline:
        i = len(statuses) % 4
        status, answer = _request(port, "POST", "/predict", _image(model, i))
        statuses.append(status)
        if status == 200:
            _check_answer(model, i, answer)
    print("statuses after the kill:", statuses)
    # The other replica answers; at most a request or two reach the dead one before the router knows.
    assert statuses.count(200) == 10 and len(statuses) <= 12, statuses
    # Serve starts a replica in the dead one's place.
    replaced = _serve_ctl(served["address"], (
        "import time\nfor _ in range(120):\n"
        "    names = [a['name'] for a in ray.util.list_named_actors(all_namespaces=True)"
        " if 'SERVE_REPLICA' in a['name'] and 'Classifier' in a['name']]\n"
        f"    if len(names) == 2 and {killed!r} not in names and serve.status().applications['mlc'].status == 'RUNNING':\n"
        "        print('replaced'); break\n    time.sleep(1)\n"), timeout=180)
    assert "replaced" in replaced


# --- export ---------------------------------------------------------------------------------------------------

# Scores the exported file with plain torch or onnxruntime in a process where mlc cannot be imported.
NO_MLC = """
import json, sys
import numpy as np
sys.modules["mlc"] = None  # any import of mlc now fails: the file must stand alone
folder, x_file = sys.argv[1], sys.argv[2]
meta = json.load(open(folder + "/model.json"))
x = np.load(x_file)
if meta["format"] == "torchscript":
    import torch
    probs = torch.jit.load(folder + "/" + meta["file"]).eval()(torch.from_numpy(x)).detach().numpy()
else:
    import onnxruntime
    session = onnxruntime.InferenceSession(folder + "/" + meta["file"])
    probs = session.run(["probabilities"], {"images": x})[0]
np.save(x_file + ".out.npy", probs)
"""


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_an_exported_model_scores_real_images_as_mlc_does_without_mlc(model, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    from mlc.data.transforms import eval_transform
    from mlc.eval.thresholds import apply_threshold
    from mlc.io.images import decode_image
    r = subprocess.run([sys.executable, "jobs/export.py", "--checkpoint", str(model["run"] / "best" / "model.pt"),
                        "--format", fmt, "--output", str(tmp_path / "exported")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "exported" / "model.json").read_text())
    assert meta["labels"] == LABELS and meta["input"]["shape"] == ["N", 3, SIZE, SIZE]
    tf = eval_transform(SIZE)
    x = np.stack([tf(decode_image(_image(model, i), "x", draft=tf.draft)).numpy() for i in range(len(model["names"]))])
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([sys.executable, "-c", NO_MLC, str(tmp_path / "exported"), str(tmp_path / "x.npy")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    probs = np.load(tmp_path / "x.npy.out.npy")
    want = model["probs"].loc[model["names"], LABELS].to_numpy(dtype=float)
    np.testing.assert_allclose(probs, want, atol=1e-5)
    keep = apply_threshold(probs, meta["threshold"]["strategy"], meta["threshold"]["value"])
    labels = [" ".join(lab for lab, k in zip(LABELS, row) if k) for row in keep]
    assert labels == model["labels"].loc[model["names"], "Labels"].tolist()


def test_export_refuses_a_caption_network(tmp_path):
    from mlc.errors import UsageError
    from mlc.model.fusion import build
    from mlc.prediction.export import export
    cfg = TrainConfig(data=str(tmp_path), output=str(tmp_path / "run"), weights="none", image_size=32,
                      inputs="caption", amp="off")
    net = build("caption", 2, num_tokens=10, weights="none", log=lambda *_: None)
    from mlc.data.tokenizer import Tokenizer
    tok = Tokenizer.fit(["a dog", "a cat"])
    save_model(str(tmp_path / "run" / "best"), bare_state_dict(net), LabelVocab(["1", "2"]),
               {"config": cfg.to_dict(), "threshold": ThresholdChoice("global", 0.5).to_dict(), "epoch": 1,
                "tokenizer": tok.to_dict()})
    with pytest.raises(UsageError, match="serve it with jobs/serve.py"):
        export(str(tmp_path / "run"), str(tmp_path / "out"), "onnx")


def test_a_caption_travels_with_its_image_and_scores_as_predict_does(model, tmp_path, monkeypatch):
    """The replica's own code (no Serve needed): an image+caption network gets the caption from a form field or
    the query, and scores as jobs/predict.py does for the same image and caption."""
    import mlc
    from mlc.data.tokenizer import Tokenizer
    from mlc.distributed import predict as ray_predict
    from mlc.distributed.serve import Classifier, RequestError, parse_body
    from mlc.model.fusion import build
    root = model["root"]
    captions = ["a man riding a horse", "two dogs on a beach", "a red bus in the street"]
    tok = Tokenizer.fit(captions)
    torch.manual_seed(1)
    net = build("image+caption", len(LABELS), num_tokens=tok.size, unfrozen_depth=1, weights="none",
                log=lambda *_: None)
    cfg = TrainConfig(data=str(root), images="imgs", output=str(tmp_path / "run"), weights="none", image_size=SIZE,
                      unfrozen_depth=1, dropout=0.0, amp="off", inputs="image+caption")
    save_model(str(tmp_path / "run" / "best"), bare_state_dict(net), LabelVocab(LABELS),
               {"config": cfg.to_dict(), "threshold": ThresholdChoice("percentile", 80.0).to_dict(), "epoch": 1,
                "tokenizer": tok.to_dict()})
    table = tmp_path / "test.csv"
    table.write_text("ImageID,Caption\n" + "".join(f'{n},"{c}"\n' for n, c in zip(model["names"], captions)))
    mlc.predict(str(tmp_path / "run"), str(root), str(tmp_path / "pred"), ids_csv=str(table), log=lambda *_: None,
                progress=False)
    want = pd.read_csv(tmp_path / "pred" / "probabilities.csv").set_index("ImageID")
    monkeypatch.setattr(ray_predict, "actor_device", lambda: torch.device("cpu"))  # not in a Ray actor here
    replica = Classifier(str(tmp_path / "run"))
    for i, caption in enumerate(captions):
        body, ctype = _multipart({"image": (_image(model, i), "x.jpg"), "caption": (caption.encode(), None)})
        image, got_caption = parse_body(body, ctype, "")
        assert image == _image(model, i) and got_caption == caption
        if i == 2:  # the query string carries it too
            image, got_caption = parse_body(_image(model, i), "image/jpeg", "caption=" + caption.replace(" ", "+"))
            assert got_caption == caption
        probs = replica._forward([replica._decode(image, got_caption)])[0]
        np.testing.assert_allclose(probs, want.loc[model["names"][i], LABELS].to_numpy(dtype=float), atol=2e-6)
    with pytest.raises(RequestError) as e:
        parse_body(b"--b\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n--b--\r\n",
                   "multipart/form-data; boundary=b", "")
    assert e.value.status == 400 and "unexpected form field" in e.value.message


def test_the_deployment_asks_serve_for_what_the_flags_say():
    """Replica resources, a fixed count or autoscaling between min and max (Serve validates these when the
    deployment is built: a wrong key would otherwise surface only on a cluster)."""
    pytest.importorskip("ray")
    from mlc.distributed.serve import deployment
    d = deployment("/nowhere", min_replicas=1, max_replicas=3, gpus=1.0, cpus=2.0, max_batch_size=8)._bound_deployment
    auto = d._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 8)
    assert d.ray_actor_options == {"num_cpus": 2.0, "num_gpus": 1.0}
    assert d._deployment_config.max_ongoing_requests == 16  # a batch being scored and the next one forming
    fixed = deployment("/nowhere", min_replicas=2, max_replicas=2)._bound_deployment._deployment_config
    assert fixed.autoscaling_config is None and fixed.num_replicas == 2
