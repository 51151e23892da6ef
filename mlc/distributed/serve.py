"""A trained model as an HTTP service on Ray Serve (jobs/serve.py).

Routes (exactly these, under the app's route prefix, ``/`` by default):

- ``POST /predict``: one image, as the raw request body or as the ``image`` part of a multipart/form-data
  body, with a caption (``caption`` form field or ``?caption=`` query parameter) for a model that reads one.
  Answers ``{"labels": [...], "scores": {label: probability}, "model": {...}, "batch_size": n}``: the labels the
  run's chosen threshold keeps, every label's probability, the model's identity (checkpoint, epoch, sha256)
  and how many requests the replica scored in that forward pass.
- ``GET /labels``: the label vocabulary and the threshold; ``GET /healthz``: ``{"status": "ok"}`` and, to a
  caller with the token (or when there is none), the model's identity.

With a token (``token_sha256``) /predict and /labels need ``Authorization: Bearer <token>``. Requests are
batched on each replica (``serve.batch``), so a GPU replica scores many images per forward pass. The body is
read with a deadline and the byte limit (:func:`mlc.distributed.serve_http.read_body`); the form is parsed and
the image decoded in a thread, so the event loop keeps answering others meanwhile. Decoding follows
training's rules (:func:`mlc.io.images.decode_image`: any format PIL reads, the pixel limit checked from the
header before decoding) and the same evaluation transform, so a served image gets the scores jobs/predict.py
gives it. A bad request gets a 4xx with ``{"error": ...}`` saying what was wrong; nothing a client sends can
end a replica.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import torch

from mlc.distributed.serve_http import (DEFAULT_MAX_BODY, DEFAULT_READ_TIMEOUT_S, RequestError, authorized,
                                        check_route, json_safe, parse_body, read_body, route_of,
                                        unauthorized)

DEFAULT_BATCH = 16
DEFAULT_BATCH_WAIT_S = 0.01
# Request slots per replica beyond the two batches (one scored, one forming): a request holds its slot while
# its body arrives, so slow senders (each cut off by the read deadline) must outnumber these to delay anyone;
# each costs a coroutine, not model work (serve.batch bounds that).
UPLOAD_SLOTS = 64


class Classifier:
    """One Serve replica: the model built once, requests decoded here and scored in batches."""

    def __init__(self, checkpoint: str, *, max_body: int = DEFAULT_MAX_BODY,
                 read_timeout_s: float = DEFAULT_READ_TIMEOUT_S, token_sha256: str | None = None,
                 tta: str | None = None):
        from mlc.data.transforms import eval_transform
        from mlc.distributed.predict import actor_device
        from mlc.model.device import prepare_device
        from mlc.config import uses_images
        from mlc.model.fusion import build, for_scoring
        from mlc.model.precision import pick_amp_dtype
        from mlc.prediction.checkpoints import load_predictor

        state, self.vocab, self.cfg, self.choice, self.tokenizer, meta = load_predictor(checkpoint, with_meta=True)
        self.cfg = self.cfg.replace(tta=tta) if tta is not None else self.cfg  # default: as the model validated
        self.identity = {"checkpoint": checkpoint, "epoch": meta.get("epoch"), "sha256": meta.get("model_sha256"),
                         "inputs": self.cfg.inputs, "tta": self.cfg.tta}
        self.reads_images = uses_images(self.cfg.inputs)
        self.transform = eval_transform(self.cfg.image_size)
        self.device = actor_device()
        prepare_device(self.device)
        self.amp_dtype = pick_amp_dtype(self.cfg.amp, self.device, kind="predict",
                                        unfrozen_depth=self.cfg.unfrozen_depth, image_size=self.cfg.image_size)
        model = build(self.cfg.inputs, len(self.vocab), model=self.cfg.model,
                      num_tokens=self.tokenizer.size if self.tokenizer else 0, unfrozen_depth=self.cfg.unfrozen_depth,
                      dropout=self.cfg.dropout, weights=state, freeze_bn=self.cfg.freeze_bn, log=lambda *_: None)
        self.model = for_scoring(model, self.amp_dtype, self.cfg.tta).to(self.device,
                                                                          memory_format=torch.channels_last).eval()
        self.max_body, self.read_timeout_s, self.token_sha256 = max_body, read_timeout_s, token_sha256

    # -- the request's inputs ---------------------------------------------------------------------------------
    def _inputs(self, body: bytes, content_type: str, query: str) -> tuple:
        """The model's inputs from a whole body; run in a thread (a form's parse and a decode take CPU time)."""
        return self._decode(*parse_body(body, content_type, query))

    def _decode(self, image: bytes | None, caption: str | None) -> tuple:
        from mlc.io.images import BadImageError, decode_image
        if caption is not None and self.tokenizer is None:
            raise RequestError(400, "this model reads images only (--inputs image); send the image without a caption")
        if caption is None and self.tokenizer is not None:
            # Scored with an empty caption, an image alone would get other scores than the client expects.
            raise RequestError(400, f"this model reads {self.cfg.inputs}: send a caption (form field 'caption' or "
                                    "?caption=; an empty one as ?caption=)")
        tokens = self.tokenizer.encode(caption) if self.tokenizer is not None else None
        if not self.reads_images:
            if image:
                raise RequestError(400, "this model reads captions only (--inputs caption); send a caption, no image")
            return None, tokens
        if not image:
            raise RequestError(400, "no image: send its bytes as the body, or a multipart form field 'image'")
        try:
            img = decode_image(image, "the request's image", self.cfg.max_image_pixels, draft=self.transform.draft)
        except BadImageError as e:
            status = 413 if e.kind == "too_large" else 415 if e.kind in ("not_image", "empty") else 422
            raise RequestError(status, e.reason) from None
        return self.transform(img), tokens

    # -- scoring ---------------------------------------------------------------------------------------------
    def _forward(self, rows: list) -> np.ndarray:
        from mlc.data.transforms import to_model_input, tokens_to_tensors
        from mlc.model.precision import autocast
        inputs = ()
        if self.reads_images:
            inputs = (to_model_input(torch.stack([r[0] for r in rows]), self.device),)
        if self.tokenizer is not None:
            inputs = inputs + tokens_to_tensors([r[1] for r in rows], self.device)
        with torch.inference_mode(), autocast(self.device, self.amp_dtype):
            logits = self.model(*inputs).float()
        return torch.sigmoid(logits).cpu().numpy()

    async def _score(self, rows: list) -> list:
        """``(probabilities, batch size)`` per row. The Serve replica wraps it in ``serve.batch`` (under this
        same name, which is how ``serve.batch`` finds ``self``): :meth:`handle` then passes one row and gets
        its own result back, while rows of concurrent requests share one forward pass."""
        # In a thread: the replica's event loop keeps taking requests, and the next batch forms meanwhile.
        probs = await asyncio.to_thread(self._forward, rows)
        return [(p, len(rows)) for p in probs]

    def answer(self, probs: np.ndarray, batch: int) -> dict:
        keep = self.choice.apply(probs[None, :])[0]
        return {"labels": [lab for lab, k in zip(self.vocab.labels, keep) if k],
                "scores": {lab: round(float(p), 7) for lab, p in zip(self.vocab.labels, probs)},
                "model": self.identity, "batch_size": batch}

    async def handle(self, method: str, route: str, headers, query: str, receive) -> tuple[int, dict, dict]:
        """``(status, JSON body, headers)`` for one request (``route``: its path below the app's route prefix,
        ``receive``: its ASGI receive); what a client sent never raises out of here."""
        try:
            check_route(method, route)
            allowed = self.token_sha256 is None or authorized(headers, self.token_sha256)
            if route == "/healthz":
                return 200, {"status": "ok", **({"model": self.identity} if allowed else {})}, {}
            if not allowed:
                raise unauthorized(headers)
            if route == "/labels":
                return 200, {"labels": self.vocab.labels, "threshold": self.choice.to_dict(),
                             "model": self.identity}, {}
            body = await read_body(receive, self.max_body, headers.get("content-length"), self.read_timeout_s)
            x, tokens = await asyncio.to_thread(self._inputs, body, headers.get("content-type", ""), query)
            probs, batch = await self._score((x, tokens))
            return 200, self.answer(probs, batch), {}
        except RequestError as e:
            return e.status, {"error": e.message}, e.headers
        except Exception as e:  # noqa: BLE001 - a bug must cost one request, never the replica
            return 500, {"error": f"internal error ({type(e).__name__}); the replica goes on serving"}, {}


def deployment(checkpoint: str, *, min_replicas: int = 1, max_replicas: int = 1, gpus: float = 0.0,
               cpus: float = 1.0, max_batch_size: int = DEFAULT_BATCH, batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
               max_body: int = DEFAULT_MAX_BODY, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
               token_sha256: str | None = None, tta: str | None = None):
    """The Serve application: :class:`Classifier` replicas behind Serve's HTTP proxy."""
    from ray import serve
    from starlette.responses import JSONResponse

    class Replica(Classifier):
        _score = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)(Classifier._score)

        async def __call__(self, request):
            scope = request.scope
            status, body, headers = await self.handle(
                request.method, route_of(scope["path"], scope.get("root_path", "")), request.headers,
                scope.get("query_string", b"").decode("latin-1"), request.receive)
            return JSONResponse(json_safe(body), status_code=status, headers=headers)

    Replica.__name__ = Replica.__qualname__ = "Classifier"
    scaling = ({"num_replicas": min_replicas} if min_replicas == max_replicas else
               {"autoscaling_config": {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                       # a replica is busy once a full batch waits for it
                                       "target_ongoing_requests": max_batch_size}})
    dep = serve.deployment(Replica, name="Classifier", ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
                           # a batch being scored, the next one forming, and uploads still arriving
                           max_ongoing_requests=2 * max_batch_size + UPLOAD_SLOTS, **scaling)
    return dep.bind(checkpoint, max_body=max_body, read_timeout_s=read_timeout_s, token_sha256=token_sha256, tta=tta)


def running_address() -> tuple[str, int] | None:
    """``(host, port)`` Serve's proxies listen on in this cluster, or None when Serve is not running. Serve keeps
    the address it started with (serve.start only warns that it ignores new options) and has no public call
    that reads it: the controller client's http_config is what its proxies were started with."""
    from ray.serve.context import _get_global_client
    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else (client.http_config.host, client.http_config.port)


def run(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, route_prefix: str = "/", name: str = "mlc",
        log=print, **options) -> str:
    """Deploy (or update) the app on the cluster this process is connected to; returns the URL it serves at.
    Refused (:class:`mlc.errors.UsageError`, before anything changes) when Serve already listens elsewhere."""
    from ray import serve

    from mlc.distributed.serve_http import check_exposure
    from mlc.errors import UsageError
    check_exposure(host, options.get("token_sha256") is not None)
    running = running_address()
    if running is not None and running != (host, port):
        apps = ", ".join(sorted(serve.status().applications)) or "none"
        raise UsageError(f"Serve already runs on this cluster, listening on {running[0]}:{running[1]} (apps: {apps}), "
                         f"not {host}:{port}; its address stays while it runs: deploy with --host {running[0]} "
                         f"--port {running[1]}, or stop it first (`serve shutdown` ends every app)")
    serve.start(http_options={"host": host, "port": port})
    t = time.perf_counter()
    serve.run(deployment(checkpoint, **options), name=name, route_prefix=route_prefix, blocking=False)
    serving = running_address()
    url = f"http://{serving[0]}:{serving[1]}{route_prefix.rstrip('/')}"
    log(f"serving {checkpoint} at {url}/predict ({time.perf_counter() - t:.1f} s to deploy)")
    return url


def describe(url: str) -> str:
    return json.dumps({"predict": f"{url}/predict", "labels": f"{url}/labels", "healthz": f"{url}/healthz"})
