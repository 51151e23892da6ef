"""The serving replicas' request rules without a cluster (mlc.distributed.serve_http): the body's deadline and
byte limit, the multipart form's limits, routes, the token, and JPEGs whose header claims more than their data.
The same rules on a real Ray head, over HTTP: tests/test_serve.py."""

from __future__ import annotations

import asyncio
import io
import itertools
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlc.io.images import jpeg_shortfall
from mlc.distributed.serve_http import (MIN_UPLOAD_RATE, RequestError, authorized, check_exposure, check_route,
                                        parse_body, parse_form, read_body, read_token, route_of,
                                        token_digest)
from mlc.errors import UsageError

FORM = "multipart/form-data; boundary=b0und"


def _form(*parts: tuple[str, bytes]) -> bytes:
    out = b"".join(f'--b0und\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n'.encode() + v + b"\r\n"
                   for n, v in parts)
    return out + b"--b0und--\r\n"


def _error(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as e:
        result = fn(*args)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    return e.value


def _feed(messages, calls: list):
    """An ASGI receive that hands out ``messages`` in order and counts its calls."""
    it = iter(messages)

    async def receive():
        calls.append(1)
        return next(it)
    return receive


def test_a_body_is_read_whole_within_its_limit():
    calls: list = []
    chunks = [{"type": "http.request", "body": b"x" * 1000, "more_body": True}] * 4
    body = asyncio.run(read_body(_feed(chunks + [{"type": "http.request", "body": b"end"}], calls), 5000, None, 5))
    assert body == b"x" * 4000 + b"end" and len(calls) == 5


def test_an_oversized_body_is_refused_as_soon_as_it_passes_the_limit_chunked_or_not():
    calls: list = []
    endless = itertools.repeat({"type": "http.request", "body": b"x" * 1000, "more_body": True})
    e = _error(read_body, _feed(endless, calls), 2500, None, 5)
    assert e.status == 413 and "at most 2500" in e.message and e.headers == {"Connection": "close"}
    assert len(calls) == 3  # the third chunk crossed the limit: nothing more was read
    calls.clear()
    e = _error(read_body, _feed(endless, calls), 2500, "3000", 5)
    assert e.status == 413 and "3000 bytes" in e.message and calls == []  # Content-Length: refused unread


def test_a_slow_body_gets_408_first_byte_or_rate():
    async def never():
        await asyncio.sleep(60)
    e = _error(read_body, never, 100, None, 0.05)  # no first byte within the read timeout
    assert e.status == 408 and "0.05 s" in e.message and e.headers == {"Connection": "close"}
    # A trickle: one byte per message while a fake clock moves 1 s per look. The allowance grows with what
    # arrived (first 10 s, then a byte per 1/MIN_UPLOAD_RATE s), so a byte a second runs out near 10 s.
    clock = itertools.count()
    calls: list = []
    trickle = itertools.repeat({"type": "http.request", "body": b"x", "more_body": True})
    e = _error(read_body, _feed(trickle, calls), 10**6, None, 10.0, lambda: next(clock))
    assert e.status == 408 and 8 <= len(calls) <= 11, len(calls)
    # The same clock, 64 KiB per message: faster than the minimum rate, read to the end.
    clock, calls = itertools.count(), []
    fast = [{"type": "http.request", "body": b"x" * 2 * MIN_UPLOAD_RATE, "more_body": True}] * 30
    body = asyncio.run(read_body(_feed(fast + [{"type": "http.request", "body": b""}], calls), 10**8, None, 10.0,
                                 lambda: next(clock)))
    assert len(body) == 60 * MIN_UPLOAD_RATE


def test_a_client_that_leaves_mid_body_gets_no_work_done():
    e = _error(read_body, _feed([{"type": "http.disconnect"}], []), 100, None, 5)
    assert e.status == 400 and "went away" in e.message


def test_a_form_gives_image_and_caption_once_each_whatever_else_it_holds():
    fields = parse_form(_form(("image", b"\xff\xd8jpeg\r\n--b0unx"), ("caption", b"a dog")), FORM)
    assert fields == {"image": b"\xff\xd8jpeg\r\n--b0unx", "caption": b"a dog"}
    bomb = _form(*[("caption", b"x")] * 40_000)  # a 40,000-part form: refused at its second part
    cases = [(bomb, "more than once"),
             (_form(("image", b"1"), ("image", b"2")), "'image' is sent more than once"),
             (_form(("other", b"x")), "unexpected form field 'other'"),
             (b"--b0und\r\n" + b"X-A: b\r\n" * 2000 + b"\r\nv\r\n--b0und--", "headers within 8192 bytes"),
             (b"--b0und\r\nContent-Disposition: form-data; name=image\r\n\r\nv", "closing boundary"),
             (b"--nope\r\n", "no parts; check the boundary"),
             (b"--b0und\r\nContent-Disposition: form-data; name=image\r\nContent-Transfer-Encoding: base64\r\n\r\n"
              b"djE=\r\n--b0und--", "Content-Transfer-Encoding")]
    for body, words in cases:
        e = _error(parse_form, body, FORM)
        assert e.status == 400 and words in e.message, (words, e.message)
    assert "boundary" in _error(parse_form, b"", "multipart/form-data").message


def test_a_caption_comes_once_from_the_form_or_the_query():
    assert parse_body(_form(("image", b"i"), ("caption", b"a cat")), FORM, "") == (b"i", "a cat")
    assert parse_body(b"i", "image/jpeg", "caption=two+dogs") == (b"i", "two dogs")
    assert parse_body(b"i", "image/jpeg", "caption=") == (b"i", "")  # an empty caption, said so
    assert parse_body(b"i", "image/jpeg", "") == (b"i", None)
    e = _error(parse_body, _form(("caption", b"x")), FORM, "caption=y")
    assert e.status == 400 and "more than once" in e.message


def test_routes_are_exact_below_the_prefix_and_never_echoed():
    assert route_of("/auth/predict", "/auth") == "/predict" and route_of("/predict", "") == "/predict"
    check_route("POST", "/predict")
    check_route("GET", "/healthz")
    for method, route, status in [("POST", "/anything/deep/predict", 404), ("GET", "/a/b/healthz", 404),
                                  ("POST", "/predict/", 404), ("GET", "", 404), ("GET", "/predict", 405),
                                  ("POST", "/labels", 405)]:
        e = _error(check_route, method, route)
        assert e.status == status, (route, e.message)
        assert status == 405 or not route or route not in e.message, e.message  # an unknown path is not echoed
    assert _error(check_route, "GET", "/predict").headers == {"Allow": "POST", "Connection": "close"}


def test_a_token_is_checked_in_constant_time_and_never_repeated(tmp_path):
    token = "t0k-" + "a" * 40
    digest = token_digest(token)
    assert authorized({"authorization": f"Bearer {token}"}, digest)
    assert authorized({"authorization": f"bearer  {token} "}, digest)
    for value in ("", f"Basic {token}", "Bearer wrong", f"Bearer {token}x", token):
        assert not authorized({"authorization": value}, digest), value
    good = tmp_path / "token"
    good.write_text(token + "\n")
    assert read_token(str(good), {}) == token
    assert read_token(None, {"MLC_SERVE_TOKEN": token}) == token and read_token(None, {}) is None
    weak = tmp_path / "weak"
    weak.write_text("hunter2")
    for path, env in [(str(weak), {}), (None, {"MLC_SERVE_TOKEN": "hunter2"}), (str(tmp_path / "none"), {})]:
        with pytest.raises(UsageError) as e:
            read_token(path, env)
        assert "hunter2" not in str(e.value)


def test_only_loopback_serves_without_a_token():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(host, has_token=False)
    for host in ("0.0.0.0", "10.0.0.5", "::", "my-host"):
        with pytest.raises(UsageError, match="--auth-token-file"):
            check_exposure(host, has_token=False)
        check_exposure(host, has_token=True)


def _jpeg(size, **kw) -> bytes:
    out = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((*size, 3)) * 255).astype("uint8")).save(out, "JPEG", **kw)
    return out.getvalue()


def _claim(data: bytes, width: int, height: int) -> bytes:
    """``data`` with its start-of-frame header saying width x height."""
    out = bytearray(data)
    at = max(out.find(b"\xff\xc0"), out.find(b"\xff\xc2"))
    struct.pack_into(">HH", out, at + 5, height, width)
    return bytes(out)


def test_a_jpeg_whose_header_claims_more_than_its_data_is_found(real_data):
    for kw in ({}, {"progressive": True}, {"subsampling": 0}):
        small = _jpeg((8, 8), **kw)
        assert jpeg_shortfall(small) is None
        assert "declares more pixels than its" in jpeg_shortfall(_claim(small, 7000, 7000))
        flat = io.BytesIO()  # the most compressible real picture: one colour, optimised tables
        Image.new("L", (7000, 7000), 3).save(flat, "JPEG", optimize=True, **kw)
        assert jpeg_shortfall(flat.getvalue()) is None
    images = sorted(Path(real_data / "images").glob("*.jpg"))[:300]
    assert images and not [p for p in images if jpeg_shortfall(p.read_bytes())]
    assert jpeg_shortfall(b"\x89PNG\r\n") is None and jpeg_shortfall(b"\xff\xd8" + b"\xff" * 10**6) is None


def test_training_and_prediction_refuse_such_a_jpeg_too():
    """The check lives in mlc.io.images.decode_image: a training row with such an image is skipped and named
    like any corrupt one, instead of training on grey pixels that are not in the file."""
    from mlc.io.images import BadImageError, decode_image
    small = _jpeg((8, 8))
    assert decode_image(small, "ok.jpg").size == (8, 8)
    with pytest.raises(BadImageError) as e:
        decode_image(_claim(small, 7000, 7000), "big.jpg", max_pixels=None)
    assert e.value.kind == "corrupt" and "declares more pixels" in e.value.reason
