"""Serving throughput and latency with and without request batching, measured side by side in one run
(jobs/bench.py --serve): two Serve apps on the same checkpoint, one replica each (one CPU), one batching up to
``max_batch`` requests per forward pass and one scoring each request alone; the same concurrent clients hit
them in alternating passes, so a slow spell of the machine falls on both."""

from __future__ import annotations

import http.client
import statistics
import threading
import time


def _client(port: int, path: str, images: list, n: int, start: int, out: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for k in range(n):
        body = images[(start + k) % len(images)]
        t = time.perf_counter()
        conn.request("POST", path, body=body)
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"{path}: HTTP {r.status}")
        out.append(time.perf_counter() - t)
    conn.close()


def load(port: int, path: str, images: list, clients: int, per_client: int) -> dict:
    """``clients`` threads, each sending ``per_client`` requests one after the other."""
    lat: list = []
    threads = [threading.Thread(target=_client, args=(port, path, images, per_client, i * per_client, lat))
               for i in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    lat.sort()
    return {"rps": len(lat) / wall, "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "requests": len(lat)}


def write_checkpoint(folder: str, image_size: int) -> None:
    """A throwaway 18-label checkpoint in ``folder``: serving cost does not depend on what the weights learnt."""
    from mlc.config import TrainConfig
    from mlc.data.labels import LabelVocab
    from mlc.eval.thresholds import ThresholdChoice
    from mlc.model.checkpoint import save_model
    from mlc.model.resnet import bare_state_dict, build_model
    cfg = TrainConfig(image_size=image_size, unfrozen_depth=1, dropout=0.0, amp="auto", output=folder)
    save_model(f"{folder}/best", bare_state_dict(build_model(18, 1, 0.0, weights="none")),
               LabelVocab([str(i) for i in range(1, 19)]),
               {"config": cfg.to_dict(), "threshold": ThresholdChoice("global", 0.5).to_dict(), "epoch": 1})


def measure(checkpoint: str, images: list, *, port: int, clients: int = 16, per_client: int = 8, passes: int = 3,
            max_batch: int = 16, batch_wait_ms: float = 10.0, log=print) -> dict:
    from ray import serve

    from mlc.distributed.serve import deployment
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    apps = {f"batched (up to {max_batch})": ("/batched", max_batch), "one request per pass": ("/single", 1)}
    for name, (prefix, batch) in apps.items():
        serve.run(deployment(checkpoint, max_batch_size=batch, batch_wait_s=batch_wait_ms / 1000, cpus=1),
                  name=prefix.strip("/"), route_prefix=prefix, blocking=False)
    for prefix, _ in apps.values():  # warm: the first forward pass of a replica is slow
        load(port, f"{prefix}/predict", images, 2, 2)
    rows: dict = {name: [] for name in apps}
    for p in range(passes):
        for name, (prefix, _) in apps.items():
            r = load(port, f"{prefix}/predict", images, clients, per_client)
            rows[name].append(r)
            log(f"  [{p + 1}/{passes}] {name:<22} {r['rps']:6.1f} req/s, p50 {r['p50_ms']:7.1f} ms, "
                f"p99 {r['p99_ms']:7.1f} ms")
    serve.shutdown()
    return {name: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50_ms", "p99_ms")}
            for name, rs in rows.items()}
