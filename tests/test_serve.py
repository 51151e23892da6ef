"""Serving (jobs/serve.py on Ray Serve) over real HTTP on a real Ray head: mlc's own scores, batches, bad and
hostile requests (a multipart bomb, 40 slow uploads, endless chunked bodies), a redeploy on another address and a
token at the door. Loads are bounded and go to 127.0.0.1 only. The request rules alone: tests/test_serve_http.py;
export: tests/test_export.py."""

from __future__ import annotations

import http.client
import io
import json
import os
import secrets
import select
import socket
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mlc.config import TrainConfig
from mlc.data.labels import LabelVocab
from mlc.eval.thresholds import ThresholdChoice
from mlc.model.checkpoint import save_model
from mlc.model.resnet import bare_state_dict
from serve_helpers import LABELS, REPO, SIZE, make_model
from serve_helpers import image as _image
from serve_helpers import multipart as _multipart

os.environ.setdefault("RAY_AUTH_MODE", "token")
# The served app's --read-timeout-s: short, so slow clients are cut off within the test, and still far above
# the few milliseconds a local body takes.
READ_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def model(real_data, tmp_path_factory):
    if not (real_data / "images").is_dir():
        pytest.skip(f"no images in {real_data}")
    return make_model(real_data, tmp_path_factory.mktemp("serve"))


def _exchange(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple:
    """``(status, headers with lower-case names, JSON answer)`` of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def _request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict]:
    status, _, answer = _exchange(port, method, path, body, headers)
    return status, answer


def _serve_ctl(address: str, code: str, timeout: float = 120) -> str:
    """Run ``code`` in a driver connected to the test cluster (the pytest process never becomes one)."""
    script = "import ray\nfrom ray import serve\nray.init(address=%r, log_to_driver=False)\n" % address + code
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _serve_job(address: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": address}
    return subprocess.run([sys.executable, "jobs/serve.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def served(model, ray_head):
    """jobs/serve.py deployed on the test cluster: 2 replicas, batches of up to 8 that wait 200 ms to fill."""
    from ray_head import free_port
    port = free_port()
    r = _serve_job(ray_head.address, "--checkpoint", str(model["run"]), "--port", str(port), "--min-replicas", "2",
                   "--max-batch-size", "8", "--batch-wait-ms", "200", "--max-body-mb", "1", "--cpus-per-replica",
                   "1", "--read-timeout-s", str(READ_TIMEOUT_S))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"http://127.0.0.1:{port}/predict" in r.stdout
    yield {"port": port, "address": ray_head.address}
    _serve_ctl(ray_head.address, "serve.shutdown()\n")


def _check_answer(model, i: int, answer: dict) -> None:
    name = model["names"][i]
    want = model["probs"].loc[name]
    got = np.array([answer["scores"][lab] for lab in LABELS])
    np.testing.assert_allclose(got, want[LABELS].to_numpy(dtype=float), atol=2e-6)
    assert " ".join(answer["labels"]) == model["labels"].loc[name, "Labels"]


# -- raw sockets: requests sent by hand, slowly or without end ------------------------------------------------------
def _raw(port: int, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(head)
    return s


def _head(**headers: str) -> bytes:
    lines = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}\r\n".encode()


def _answered(socks: list) -> list:
    """The sockets with an answer (or the server's close) waiting to be read."""
    return select.select(socks, [], [], 0)[0] if socks else []


def _answer(sock: socket.socket) -> tuple[int, dict, dict]:
    r = http.client.HTTPResponse(sock)
    r.begin()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(r.read() or b"{}")


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
    twice = (body.replace(b'name="caption"', b'name="image"'), ctype)
    claims = _claims_more(_image(model, 0))
    cases = [
        (("POST", "/predict", b"<html>403 Forbidden</html>"), 415, "looks like an HTML page"),
        (("POST", "/predict", b""), 400, "no image"),
        (("POST", "/predict", big.getvalue()), 413, "pixels"),
        (("POST", "/predict", b"x" * (2 * 2**20)), 413, "at most 1048576"),
        (("POST", "/predict", _image(model, 0)[:200]), 422, "corrupt image"),
        (("POST", "/predict", body, {"Content-Type": ctype}), 400, "reads images only"),
        (("POST", "/predict", b"--nope\r\n", {"Content-Type": "multipart/form-data; boundary=zzz"}), 400, "multipart"),
        (("POST", "/predict", twice[0], {"Content-Type": twice[1]}), 400, "'image' is sent more than once"),
        (("POST", "/predict", claims), 422, "declares more pixels than"),
        (("GET", "/predict"), 405, "POST"),
        (("POST", "/labels"), 405, "GET"),
        (("GET", "/nowhere"), 404, "no such route"),
        # Routes are exact: the last segment alone no longer answers, and no path is echoed.
        (("POST", "/anything/deep/predict", _image(model, 0)), 404, "no such route"),
        (("GET", "/a/b/healthz"), 404, "no such route"),
        (("GET", "/healthz/"), 404, "no such route"),
    ]
    for args, status, words in cases:
        got, answer = _request(port, *args)
        assert got == status and words in answer["error"], (args[:2], got, answer)
        assert args[1] in ("/predict", "/labels") or args[1] not in answer["error"]
    status, health = _request(port, "GET", "/healthz")
    assert status == 200


def _claims_more(jpeg: bytes) -> bytes:
    """A real image as an 8 x 8 JPEG whose header says 440 x 440 (under the pixel limit): data for 1 of the
    3,025 blocks it declares."""
    small = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).resize((8, 8)).save(small, "JPEG", subsampling=0)
    out = bytearray(small.getvalue())
    struct.pack_into(">HH", out, out.find(b"\xff\xc0") + 5, 440, 440)
    return bytes(out)


def test_a_multipart_bomb_is_refused_and_holds_nobody_up(model, served):
    """A form of thousands of tiny parts (the old parser ran them all on the replica's event loop): while one is
    still arriving a normal request is answered, and each gets its 400 at its second part."""
    port = served["port"]
    part = b'--B\r\nContent-Disposition: form-data; name="caption"\r\n\r\nx\r\n'
    bomb = part * ((2**20 - 100) // len(part)) + b"--B--\r\n"  # 17,000 parts, under the app's 1 MB
    head = _head(Content_Type="multipart/form-data; boundary=B", Content_Length=str(len(bomb)))
    held = _raw(port, head + bomb[:-10])  # all but its last bytes: the replica is still reading it
    try:
        status, answer = _request(port, "POST", "/predict", _image(model, 0))
        assert status == 200, answer
        _check_answer(model, 0, answer)
        assert not _answered([held]), "the bomb was answered before it was whole"
        held.sendall(bomb[-10:])
        status, _, answer = _answer(held)
        assert status == 400 and "'caption' is sent more than once" in answer["error"], answer
    finally:
        held.close()
    with ThreadPoolExecutor(8) as pool:  # whole bombs and normal requests at once
        bombs = [pool.submit(_request, port, "POST", "/predict", bomb, {"Content-Type": "multipart/form-data; "
                                                                          "boundary=B"}) for _ in range(4)]
        normal = [pool.submit(_request, port, "POST", "/predict", _image(model, i)) for i in range(4)]
        assert [f.result()[0] for f in bombs] == [400] * 4
        for i, f in enumerate(normal):
            assert f.result()[0] == 200
            _check_answer(model, i, f.result()[1])


def _trickle(socks: list, answers: dict) -> None:
    """Read the answers that came, then send one more byte on every other socket."""
    for s in _answered([s for s in socks if s not in answers]):
        answers[s] = _answer(s)
    for s in socks:
        if s not in answers:
            try:
                s.send(b"\xff")
            except OSError:  # closed after its answer, which the next look reads
                pass


def test_slow_uploads_are_cut_off_with_408_and_starve_nobody(model, served):
    """40 clients trickle their bodies a byte a second (more than the old 2 x 16 request slots of the app's two
    replicas): a normal request is answered while all 40 still trickle, each of them then gets a 408 and the
    connection closed, and the app answers as before."""
    port = served["port"]
    slow = [_raw(port, _head(Content_Type="image/jpeg", Content_Length="1000") + b"\xff") for _ in range(40)]
    answers: dict = {}
    try:
        time.sleep(0.5)  # the 40 requests reach the replicas
        with ThreadPoolExecutor(1) as pool:
            normal = pool.submit(_request, port, "POST", "/predict", _image(model, 1))
            while True:
                try:
                    status, answer = normal.result(timeout=1)
                    break
                except FutureTimeout:
                    _trickle(slow, answers)
        assert status == 200, answer
        _check_answer(model, 1, answer)
        assert not answers and not _answered(slow), "a slow upload ended before the normal request was answered"
        deadline = time.time() + 10 * READ_TIMEOUT_S
        while len(answers) < len(slow) and time.time() < deadline:
            time.sleep(1)
            _trickle(slow, answers)
    finally:
        for s in slow:
            s.close()
    assert len(answers) == len(slow), f"{len(slow) - len(answers)} slow uploads never got an answer"
    for status, headers, answer in answers.values():
        assert status == 408 and "came too slowly" in answer["error"] and headers["connection"] == "close"
    status, answer = _request(port, "POST", "/predict", _image(model, 2))
    assert status == 200, answer


def _endless(port: int, total: int) -> tuple[int, int, dict]:
    """A chunked body of ``total`` bytes, sent until the server answers: ``(status, bytes sent, answer)``."""
    s = _raw(port, _head(Content_Type="image/jpeg", Transfer_Encoding="chunked"))
    block = bytes(2**16)
    frame, sent = b"10000\r\n" + block + b"\r\n", 0
    try:
        while sent < total and not _answered([s]):
            try:
                s.sendall(frame)
            except OSError:  # the server closed the connection after its answer
                break
            sent += len(block)
        status, _, answer = _answer(s)
    finally:
        s.close()
    return status, sent, answer


def _own_rss_mb(pid: int) -> float:
    """The process's resident memory without the shared pages of Ray's object store it has touched (RssShmem):
    a body over 100 KB travels from the proxy to a replica through that store, whose pages the store reuses and
    which are counted once for the machine, in /dev/shm, and only while an object lives. What stays here is the
    process's own heap (RssAnon) and mapped files (RssFile): the memory a leak or a body read whole would grow."""
    with open(f"/proc/{pid}/status") as f:
        kb = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f) if k in ("VmRSS", "RssShmem")}
    return (kb["VmRSS"] - kb["RssShmem"]) / 1024


def _burst(port: int) -> None:
    """Four chunked bodies of 200 MB at once against the app's 1 MB limit: each gets its 413 long before it is
    sent whole (what the client managed to send meanwhile is what the proxy read ahead)."""
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: _endless(port, 200 * 2**20), range(4)))
    for status, sent, answer in results:
        assert status == 413 and "at most 1048576" in answer["error"], answer
        # Half the body: what a client sends before its 413 is what the proxy read ahead meanwhile, 5-20 MB
        # usually, 52 MB once when the two cores were loaded (CI); a body read whole would be all 200 MB.
        assert sent < 100 * 2**20, f"{sent / 2**20:.0f} MB of 200 MB were sent before the 413"


def test_endless_chunked_bodies_get_413_early_and_memory_comes_back(model, served):
    """Bursts of chunked 200 MB bodies: each gets its 413 early, and the replicas' and the HTTP proxy's own
    memory comes back to within 10% of where it was before two more bursts (the old replica read each body
    whole: four at once took the proxy from 210 to 854 MB, a replica from 1043 to 2031 MB, and it stayed)."""
    port = served["port"]
    # The replicas' and the proxy's pids: the cluster's state API lists every actor with its class and pid (the
    # replicas are this app's ServeReplica actors, the proxy Serve's ProxyActor); the cluster runs on this
    # machine, so /proc/<pid>/status gives their resident memory.
    listed = _serve_ctl(served["address"], (
        "from ray.util.state import list_actors\n"
        "for a in list_actors(filters=[('state', '=', 'ALIVE')], limit=10000):\n"
        "    if a.class_name in ('ServeReplica:mlc:Classifier', 'ProxyActor'): print(a.class_name, a.pid)\n"))
    pids = {int(pid): name for name, pid in (line.split() for line in listed.splitlines() if line.strip())}
    assert sorted(pids.values()).count("ServeReplica:mlc:Classifier") == 2 and "ProxyActor" in pids.values()
    # The baseline follows one burst of the same shape: the first sizes the allocators' pools (the proxy's heap
    # grew by 10-25 MB once, measured: the 5-20 MB each client sends before its 413 are read ahead at once),
    # which the next bursts reuse. A body kept, or read whole, would grow memory with every burst.
    _burst(port)
    for i in range(2):
        assert _request(port, "POST", "/predict", _image(model, i))[0] == 200
    before = {pid: _own_rss_mb(pid) for pid in pids}
    for _ in range(2):
        _burst(port)
    # Looked at again, with a normal request between looks (at most 30), until it is back: a request's buffers
    # go a little after its answer, not at the instant the client reads it.
    for i in range(30):
        after = {pid: _own_rss_mb(pid) for pid in pids}
        if all(abs(after[p] - before[p]) <= 0.1 * before[p] for p in pids):
            break
        assert _request(port, "POST", "/predict", _image(model, i % 12))[0] == 200
        time.sleep(1)
    print("own memory:", {f"{pids[p]} {p}": f"{before[p]:.0f} -> {after[p]:.0f} MB" for p in pids})
    for pid, name in pids.items():
        assert abs(after[pid] - before[pid]) <= 0.1 * before[pid], (name, before[pid], after[pid])


def test_a_redeploy_on_another_address_is_refused_and_the_app_goes_on(model, served):
    """Serve keeps the address it started with: a deploy asking for another port is refused (exit 2, saying
    what listens where) before anything changes, instead of printing an address nothing serves."""
    from ray_head import free_port
    other = free_port()
    r = _serve_job(served["address"], "--checkpoint", str(model["run"]), "--port", str(other),
                   "--gpus-per-replica", "0")
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("error: Serve already runs") and f"127.0.0.1:{served['port']}" in error, error
    assert "apps: mlc" in error and "serving" not in r.stdout
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", other), timeout=5).close()
    status, answer = _request(served["port"], "POST", "/predict", _image(model, 0))
    assert status == 200 and answer["model"]["checkpoint"] == str(model["run"])


def test_a_token_guards_predict_and_labels(model, served, tmp_path):
    """A second app with --auth-token-file on the same Serve (a deploy on its running address is taken):
    /predict and /labels answer 401 JSON without the right bearer token, /healthz says only that it is up."""
    port, token = served["port"], secrets.token_hex(32)
    (tmp_path / "token").write_text(token + "\n")
    r = _serve_job(served["address"], "--checkpoint", str(model["run"]), "--port", str(port), "--name", "mlc-auth",
                   "--route-prefix", "/auth", "--auth-token-file", str(tmp_path / "token"), "--gpus-per-replica",
                   "0", "--max-body-mb", "1", "--read-timeout-s", str(READ_TIMEOUT_S))
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"http://127.0.0.1:{port}/auth/predict" in r.stdout and token not in r.stdout + r.stderr
        good = {"Authorization": f"Bearer {token}"}
        for headers, said in [({}, "no token"), ({"Authorization": "Bearer " + "0" * 64}, "a wrong token"),
                              ({"Authorization": f"Basic {token}"}, "a wrong token")]:
            for method, path, body in [("POST", "/auth/predict", _image(model, 0)), ("GET", "/auth/labels", b"")]:
                status, got, answer = _exchange(port, method, path, body, headers)
                assert status == 401 and said in answer["error"] and got["www-authenticate"].startswith("Bearer")
        status, answer = _request(port, "POST", "/auth/predict", _image(model, 0), good)
        assert status == 200, answer
        _check_answer(model, 0, answer)
        assert _request(port, "GET", "/auth/labels", b"", good) [1]["labels"] == LABELS
        assert _request(port, "GET", "/auth/healthz") == (200, {"status": "ok"})
        assert _request(port, "GET", "/auth/healthz", b"", good)[1]["model"]["checkpoint"] == str(model["run"])
        assert _request(port, "GET", "/auth/a/healthz")[0] == 404 and _request(port, "GET", "/auth")[0] == 404
        assert _request(port, "GET", "/labels")[0] == 200  # the first app, on loopback without a token, as it was
    finally:
        _serve_ctl(served["address"], "serve.delete('mlc-auth')\n")


def test_serving_beyond_loopback_needs_a_token(model, tmp_path):
    """Before anything starts: a --host other than loopback without a token, or a weak token, is one error line
    and exit 2 (the token never shown)."""
    (tmp_path / "weak").write_text("hunter2\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLC_SERVE_TOKEN")}
    for extra, words in [([], "--host 0.0.0.0 is reachable from other machines"),
                         (["--auth-token-file", str(tmp_path / "weak")], "at least 32 characters")]:
        r = subprocess.run([sys.executable, "jobs/serve.py", "--checkpoint", str(model["run"]), "--host", "0.0.0.0",
                            *extra], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and words in r.stderr, r.stderr[-2000:]
        assert "hunter2" not in r.stderr + r.stdout and len(r.stderr.strip().splitlines()) == 1


def test_a_killed_replica_is_replaced_and_the_endpoint_keeps_answering(model, served):
    port = served["port"]
    killed = _serve_ctl(served["address"], (
        "names = [a['name'] for a in ray.util.list_named_actors(all_namespaces=True)"
        " if a['name'].startswith('SERVE_REPLICA::mlc#Classifier')]\n"
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
        " if a['name'].startswith('SERVE_REPLICA::mlc#Classifier')]\n"
        f"    if len(names) == 2 and {killed!r} not in names and serve.status().applications['mlc'].status == 'RUNNING':\n"
        "        print('replaced'); break\n    time.sleep(1)\n"), timeout=180)
    assert "replaced" in replaced


def test_a_caption_travels_with_its_image_and_scores_as_predict_does(model, tmp_path, monkeypatch):
    """The replica's own code (no Serve needed): an image+caption network gets the caption from a form field or
    the query, and scores as jobs/predict.py does for the same image and caption; an image alone is refused
    (scored with an empty caption it would get other scores than the client expects), an empty caption said
    as ?caption= is taken."""
    import mlc
    from mlc.data.tokenizer import Tokenizer
    from mlc.distributed import predict as ray_predict
    from mlc.distributed.serve import Classifier
    from mlc.distributed.serve_http import RequestError, parse_body
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
        replica._inputs(_image(model, 0), "image/jpeg", "")
    assert e.value.status == 400 and "send a caption" in e.value.message
    x, tokens = replica._inputs(_image(model, 0), "image/jpeg", "caption=")
    assert tokens == [] and tuple(x.shape) == (3, SIZE, SIZE)


def test_the_deployment_asks_serve_for_what_the_flags_say():
    """Replica resources, a fixed count or autoscaling between min and max (Serve validates these when the
    deployment is built: a wrong key would otherwise surface only on a cluster)."""
    pytest.importorskip("ray")
    from mlc.distributed.serve import UPLOAD_SLOTS, deployment
    d = deployment("/nowhere", min_replicas=1, max_replicas=3, gpus=1.0, cpus=2.0, max_batch_size=8)._bound_deployment
    auto = d._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 8)
    assert d.ray_actor_options == {"num_cpus": 2.0, "num_gpus": 1.0}
    # a batch being scored, the next one forming, and room for uploads still arriving
    assert d._deployment_config.max_ongoing_requests == 16 + UPLOAD_SLOTS
    fixed = deployment("/nowhere", min_replicas=2, max_replicas=2)._bound_deployment._deployment_config
    assert fixed.autoscaling_config is None and fixed.num_replicas == 2
