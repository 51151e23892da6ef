"""A trained model as an HTTP service on Ray Serve (jobs/serve.py).

Routes (under the app's route prefix, ``/`` by default):

- ``POST /predict``: one image, as the raw request body or as the ``image`` part of a multipart/form-data
  body, with an optional caption (``caption`` form field or ``?caption=`` query parameter). Answers
  ``{"labels": [...], "scores": {label: probability}, "model": {...}, "batch_size": n}``: the labels the
  run's chosen threshold keeps, every label's probability, the model's identity (checkpoint, epoch,
  sha256) and how many requests the replica scored in that forward pass.
- ``GET /labels``: the label vocabulary and the threshold; ``GET /healthz``: the model's identity.

Requests are batched on each replica (``serve.batch``), so a GPU replica scores many images per forward
pass. Decoding follows training's rules (:func:`mlc.io.images.decode_image`: any format PIL reads, the
pixel limit checked from the header before decoding) and the same evaluation transform, so a served image
gets the scores jobs/predict.py gives it. A bad request gets a 4xx with ``{"error": ...}`` saying what was
wrong; nothing a client sends can end a replica.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import time
from urllib.parse import parse_qs

import numpy as np
import torch

# What one request may carry: the largest real COMP5329 JPEG is under 100 KB, a phone photo a few MB.
DEFAULT_MAX_BODY = 20 * 2**20
DEFAULT_BATCH = 16
DEFAULT_BATCH_WAIT_S = 0.01


class RequestError(Exception):
    """A bad request: its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_body(body: bytes, content_type: str, query: str) -> tuple[bytes | None, str | None]:
    """``(image bytes or None, caption or None)`` from a raw or multipart/form-data body."""
    caption = parse_qs(query).get("caption", [None])[0]
    if content_type.lower().startswith("multipart/form-data"):
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
        if not msg.is_multipart():
            raise RequestError(400, "malformed multipart/form-data body (no parts; check the boundary)")
        image = None
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name == "image":
                image = part.get_payload(decode=True) or b""
            elif name == "caption":
                caption = (part.get_payload(decode=True) or b"").decode("utf-8", errors="replace")
            else:
                raise RequestError(400, f"unexpected form field {str(name)[:40]!r}; send 'image' and optionally 'caption'")
        return image, caption
    return (body or None), caption


def json_safe(obj):
    """``obj`` with every non-finite float as None: JSON has no NaN (a threshold saved without its validation
    F1 holds one), and a response must always be valid JSON."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


class Classifier:
    """One Serve replica: the model built once, requests decoded here and scored in batches."""

    def __init__(self, checkpoint: str, *, max_body: int = DEFAULT_MAX_BODY):
        from mlc.data.transforms import eval_transform
        from mlc.distributed.predict import actor_device
        from mlc.model.device import prepare_device
        from mlc.config import uses_images
        from mlc.model.fusion import build, for_scoring
        from mlc.model.precision import pick_amp_dtype
        from mlc.prediction.checkpoints import load_predictor

        state, self.vocab, self.cfg, self.choice, self.tokenizer, meta = load_predictor(checkpoint, with_meta=True)
        self.identity = {"checkpoint": checkpoint, "epoch": meta.get("epoch"), "sha256": meta.get("model_sha256"),
                         "inputs": self.cfg.inputs}
        self.reads_images = uses_images(self.cfg.inputs)
        self.transform = eval_transform(self.cfg.image_size)
        self.device = actor_device()
        prepare_device(self.device)
        self.amp_dtype = pick_amp_dtype(self.cfg.amp, self.device, kind="predict",
                                        unfrozen_depth=self.cfg.unfrozen_depth, image_size=self.cfg.image_size)
        model = build(self.cfg.inputs, len(self.vocab), num_tokens=self.tokenizer.size if self.tokenizer else 0,
                      unfrozen_depth=self.cfg.unfrozen_depth, dropout=self.cfg.dropout, weights=state,
                      freeze_bn=self.cfg.freeze_bn, log=lambda *_: None)
        self.model = for_scoring(model, self.amp_dtype).to(self.device, memory_format=torch.channels_last).eval()
        self.max_body = max_body

    # -- the request's inputs ---------------------------------------------------------------------------------
    def _decode(self, image: bytes | None, caption: str | None) -> tuple:
        from mlc.io.images import BadImageError, decode_image
        if caption is not None and self.tokenizer is None:
            raise RequestError(400, "this model reads images only (--inputs image); send the image without a caption")
        tokens = self.tokenizer.encode(caption or "") if self.tokenizer is not None else None
        if not self.reads_images:
            if image:
                raise RequestError(400, "this model reads captions only (--inputs caption); send a caption, no image")
            if caption is None:
                raise RequestError(400, "send a caption (form field 'caption' or ?caption=)")
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

    async def handle(self, method: str, path: str, headers: dict, query: str, read_body) -> tuple[int, dict]:
        """``(status, JSON body)`` for one request; what a client sent never raises out of here."""
        try:
            route = "/" + path.strip("/").rsplit("/", 1)[-1] if path.strip("/") else "/"
            if route == "/healthz":
                return 200, {"status": "ok", "model": self.identity}
            if route == "/labels":
                return 200, {"labels": self.vocab.labels, "threshold": self.choice.to_dict(), "model": self.identity}
            if route != "/predict":
                return 404, {"error": f"no route {path!r}; use POST /predict, GET /labels or GET /healthz"}
            if method != "POST":
                return 405, {"error": "POST an image to /predict"}
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                return 413, {"error": f"request body of {int(length)} bytes; at most {self.max_body} are accepted"}
            body = await read_body()
            if len(body) > self.max_body:
                return 413, {"error": f"request body over {self.max_body} bytes"}
            image, caption = parse_body(body, headers.get("content-type", ""), query)
            x, tokens = await asyncio.to_thread(self._decode, image, caption)
            probs, batch = await self._score((x, tokens))
            return 200, self.answer(probs, batch)
        except RequestError as e:
            return e.status, {"error": e.message}
        except Exception as e:  # noqa: BLE001 - a bug must cost one request, never the replica
            return 500, {"error": f"internal error ({type(e).__name__}); the replica goes on serving"}


def deployment(checkpoint: str, *, min_replicas: int = 1, max_replicas: int = 1, gpus: float = 0.0,
               cpus: float = 1.0, max_batch_size: int = DEFAULT_BATCH, batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
               max_body: int = DEFAULT_MAX_BODY):
    """The Serve application: :class:`Classifier` replicas behind Serve's HTTP proxy."""
    from ray import serve
    from starlette.responses import JSONResponse

    class Replica(Classifier):
        _score = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)(Classifier._score)

        async def __call__(self, request):
            status, body = await self.handle(request.method, request.url.path, dict(request.headers),
                                             request.url.query, request.body)
            return JSONResponse(json_safe(body), status_code=status)

    Replica.__name__ = Replica.__qualname__ = "Classifier"
    scaling = ({"num_replicas": min_replicas} if min_replicas == max_replicas else
               {"autoscaling_config": {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                       # a replica is busy once a full batch waits for it
                                       "target_ongoing_requests": max_batch_size}})
    dep = serve.deployment(Replica, name="Classifier", ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
                           # room for a batch being scored and the next one forming
                           max_ongoing_requests=2 * max_batch_size, **scaling)
    return dep.bind(checkpoint, max_body=max_body)


def run(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, route_prefix: str = "/", name: str = "mlc",
        log=print, **options) -> str:
    """Deploy (or update) the app on the cluster this process is connected to; returns its URL."""
    from ray import serve
    serve.start(http_options={"host": host, "port": port})
    t = time.perf_counter()
    serve.run(deployment(checkpoint, **options), name=name, route_prefix=route_prefix, blocking=False)
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    log(f"serving {checkpoint} at {url}/predict ({time.perf_counter() - t:.1f} s to deploy)")
    return url


def describe(url: str) -> str:
    return json.dumps({"predict": f"{url}/predict", "labels": f"{url}/labels", "healthz": f"{url}/healthz"})
