"""What an HTTP request to a served model may be, and how it is read (the replicas of :mod:`mlc.distributed.serve`).

Everything a replica does before the model sees an image: the route (exact, under the app's route prefix), the
token (``Authorization: Bearer``, compared in constant time), the body (read with a deadline and the byte limit
enforced while it arrives, chunked or not) and the multipart form (at most the two fields we read, each with
bounded headers, found with ``bytes.find``: linear time whatever the client sends). A bad request is a
:class:`RequestError`: its status, a message that never repeats the request's path or bytes, and any headers
the answer needs. No Ray here: the checks are plain functions, tested without a cluster.
"""

from __future__ import annotations

import asyncio
import email.message
import email.parser
import email.policy
import hashlib
import hmac
import ipaddress
import math
import re
import time
from urllib.parse import parse_qs

# What one request may carry: the largest real COMP5329 JPEG is under 100 KB, a phone photo a few MB.
DEFAULT_MAX_BODY = 20 * 2**20
# A client sends its body right behind its headers; 10 s to the first byte covers a slow mobile link's round
# trips and still frees the slot of a client that sends nothing (slow uploads hold a replica's request slot).
DEFAULT_READ_TIMEOUT_S = 10.0
# After the first byte, the body must keep up 32 KiB/s (256 kbit/s, a weak mobile uplink: a COMP5329 image in
# 3 s, a 5 MB photo in under 3 minutes). Holding a slot for a minute then costs a client 2 MB of sending, where
# a trickle of 1 byte/s held one for ever.
MIN_UPLOAD_RATE = 32 * 1024
# A form part's headers (Content-Disposition, Content-Type) are under 200 bytes from curl or a browser.
MAX_PART_HEADERS = 8 * 1024
# The form fields read; a form holds each at most once, so a part beyond the second is an error found at once.
FIELDS = ("image", "caption")
# The app's routes (below its route prefix) and the one method each answers.
ROUTES = {"/predict": "POST", "/labels": "GET", "/healthz": "GET"}
USE = "use POST /predict, GET /labels or GET /healthz under the app's route prefix"
# Where the token may come from when no --auth-token-file is given (e.g. a Kubernetes Secret as an env var).
TOKEN_ENV = "MLC_SERVE_TOKEN"
# RFC 6750's b64token, at least 32 characters (`openssl rand -hex 32` gives 64): a token people can guess or
# type is refused before anything is deployed.
TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]{32,}=*")
# Sent with every answer given before the body is read whole (or at all): a body left unread can only be
# stopped by closing its connection, else the proxy keeps reading it to throw it away.
CLOSE = {"Connection": "close"}


class RequestError(Exception):
    """A bad request: its HTTP status, a message for the client and the headers its answer needs."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# -- route and token ---------------------------------------------------------------------------------------------
def route_of(path: str, root_path: str) -> str:
    """The request's path below the app's route prefix (Serve's proxy puts the prefix in ``root_path``)."""
    return path[len(root_path):] if root_path and path.startswith(root_path) else path


def check_route(method: str, route: str) -> None:
    """404 for a path that is not exactly a route (never repeated: it is the client's text), 405 for another
    method; both close the connection, as any answer given before the body is read does."""
    if route not in ROUTES:
        raise RequestError(404, f"no such route; {USE}", CLOSE)
    if method != ROUTES[route]:
        raise RequestError(405, f"{route} answers {ROUTES[route]} only; {USE}", {"Allow": ROUTES[route], **CLOSE})


def token_digest(token: str) -> str:
    """What a replica keeps of the token: its SHA-256, so the token itself is in no deployment's arguments."""
    return hashlib.sha256(token.encode()).hexdigest()


def authorized(headers, digest: str) -> bool:
    """Whether ``Authorization: Bearer <token>`` carries the token; the digests are compared in constant time."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token_digest(token.strip()), digest)


def unauthorized(headers) -> RequestError:
    said = "a wrong token" if headers.get("authorization") else "no token"
    return RequestError(401, f"{said}: send 'Authorization: Bearer <token>'",
                        {"WWW-Authenticate": 'Bearer realm="mlc"', **CLOSE})


def read_token(path: str | None, environ) -> str | None:
    """The token from ``path`` (--auth-token-file), else from $MLC_SERVE_TOKEN, else None; never echoed."""
    from mlc.errors import UsageError
    where = f"--auth-token-file {path}" if path else f"${TOKEN_ENV}"
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{where}: cannot read it ({type(e).__name__})") from None
    else:
        token = environ.get(TOKEN_ENV)
        if token is None:
            return None
        token = token.strip()
    if not TOKEN_RE.fullmatch(token):
        raise UsageError(f"{where}: a token is one line of at least 32 characters from A-Z a-z 0-9 - . _ ~ + / "
                         "(e.g. `openssl rand -hex 32`)")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, has_token: bool) -> None:
    """Anyone who reaches a non-loopback address could use the replicas' GPUs: such a --host needs a token."""
    from mlc.errors import UsageError
    if not has_token and not is_loopback(host):
        raise UsageError(f"--host {host} is reachable from other machines: give --auth-token-file (or "
                         f"${TOKEN_ENV}), or serve on 127.0.0.1")


# -- the body ----------------------------------------------------------------------------------------------------
async def read_body(receive, limit: int, length: str | None, first_byte_s: float, clock=time.monotonic) -> bytes:
    """The request body from the ASGI ``receive``, at most ``limit`` bytes (413 as soon as it is more, chunked or
    not), the first byte within ``first_byte_s`` and then at least :data:`MIN_UPLOAD_RATE` (408 otherwise)."""
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError(413, f"request body of {int(length)} bytes; at most {limit} are accepted", CLOSE)
    start, size, chunks = clock(), 0, []
    while True:
        left = start + first_byte_s + size / MIN_UPLOAD_RATE - clock()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            raise RequestError(408, f"the request body came too slowly: it must start within {first_byte_s:g} s "
                                    f"and then keep up {MIN_UPLOAD_RATE // 1024} KiB/s", CLOSE) from None
        if message["type"] != "http.request":  # http.disconnect: nobody is left to answer
            raise RequestError(400, "the client went away before sending its whole body", CLOSE)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body over {limit} bytes; at most {limit} are accepted", CLOSE)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def parse_body(body: bytes, content_type: str, query: str) -> tuple[bytes | None, str | None]:
    """``(image bytes or None, caption or None)`` from a raw or multipart/form-data body and the query."""
    captions = parse_qs(query, keep_blank_values=True).get("caption", [])  # ?caption= is an empty caption
    if content_type.lower().startswith("multipart/form-data"):
        fields = parse_form(body, content_type)
        image = fields.get("image")
        if "caption" in fields:
            captions.append(fields["caption"].decode("utf-8", errors="replace"))
    else:
        image = body or None
    if len(captions) > 1:
        raise RequestError(400, "the caption is given more than once (form field and query); send it once")
    return image, (captions[0] if captions else None)


def parse_form(body: bytes, content_type: str) -> dict:
    """The ``image`` and ``caption`` fields of a multipart/form-data body; any other field, a field sent twice,
    part headers over :data:`MAX_PART_HEADERS` or a form without its boundaries is a 400."""
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not 0 < len(boundary) <= 70:  # RFC 2046: 1 to 70 characters
        raise RequestError(400, "multipart/form-data without a usable boundary parameter")
    delimiter = b"--" + boundary.encode("latin-1")
    at = body.find(delimiter)
    if at < 0:
        raise RequestError(400, "malformed multipart/form-data body (no parts; check the boundary)")
    fields: dict = {}
    at += len(delimiter)
    while not body.startswith(b"--", at):
        line_end = body.find(b"\r\n", at, at + 200)  # transport padding may follow a boundary, then CRLF
        heads_end = body.find(b"\r\n\r\n", line_end, line_end + MAX_PART_HEADERS) if line_end >= 0 else -1
        if heads_end < 0:
            raise RequestError(400, f"malformed multipart/form-data part (no end of its headers within "
                                    f"{MAX_PART_HEADERS} bytes)")
        end = body.find(b"\r\n" + delimiter, heads_end + 4)
        if end < 0:
            raise RequestError(400, "malformed multipart/form-data body (a part without its closing boundary)")
        name = _field_name(body[line_end + 2:heads_end + 2])
        if name not in FIELDS:
            raise RequestError(400, f"unexpected form field {name[:40]!r}; send 'image' and optionally 'caption'")
        if name in fields:
            raise RequestError(400, f"the form field {name!r} is sent more than once; send it once")
        fields[name] = body[heads_end + 4:end]
        at = end + 2 + len(delimiter)
    return fields


def _field_name(heads: bytes) -> str:
    part = email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(heads)
    encoding = str(part.get("content-transfer-encoding", "binary")).strip().lower()
    if encoding not in ("binary", "8bit", "7bit"):
        raise RequestError(400, "a form part with a Content-Transfer-Encoding; send the bytes as they are")
    return str(part.get_param("name", "", header="content-disposition"))


def json_safe(obj):
    """``obj`` with every non-finite float as None: JSON has no NaN (a threshold saved without its validation
    F1 holds one), and a response must always be valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
