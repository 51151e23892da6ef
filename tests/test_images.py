"""mlc.io.images: every kind of file the real dataset (or a careless copy of it) can hold."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
from PIL import Image, ImageFile

from mlc.io import images
from mlc.data.sources import load_image
from mlc.io.images import BadImageError, decode_image, read_header


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _write(folder, name: str, data: bytes) -> str:
    path = os.path.join(str(folder), name)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.fixture
def files(tmp_path):
    """The zoo of files, written to disk as the dataset would hold them (all named .jpg)."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8), "RGB")
    good_jpeg = _encode(photo, "JPEG", quality=90)

    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent, black underneath
    rgba.paste((200, 10, 10, 255), (0, 0, 16, 32))  # opaque red left half

    palette = Image.new("P", (20, 10), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    palette.paste(1, (0, 0, 10, 10))

    made = {
        "good.jpg": good_jpeg,
        "gray_png.jpg": _encode(Image.new("L", (30, 20), 77), "PNG"),
        "cmyk.jpg": _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
        "rgba.jpg": _encode(rgba, "PNG"),
        "palette.jpg": _encode(palette, "PNG"),
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "garbage.jpg": rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes(),
        "empty.jpg": b"",
        # A 16 Mpx image of one colour compresses to a few kB: the classic bomb shape.
        "bomb.jpg": _encode(Image.new("L", (4000, 4000), 0), "PNG"),
    }
    return {name: _write(tmp_path, name, data) for name, data in made.items()}


def test_good_rgb_jpeg(files):
    im = load_image(files["good.jpg"])
    assert im.mode == "RGB" and im.size == (64, 48)


def test_grayscale_png_named_jpg(files):
    im = load_image(files["gray_png.jpg"])
    assert im.mode == "RGB" and im.size == (30, 20)
    assert im.getpixel((5, 5)) == (77, 77, 77)
    assert read_header(open(files["gray_png.jpg"], "rb").read(), "g")["format"] == "PNG"


def test_cmyk_jpeg(files):
    im = load_image(files["cmyk.jpg"])
    assert im.mode == "RGB" and im.size == (16, 16)
    r, g, b = im.getpixel((8, 8))
    assert r > 200 and g < 50 and b < 50  # C=0 M=Y=255 is red, not its inverse


def test_rgba_transparent_area_is_white(files):
    im = load_image(files["rgba.jpg"])
    assert im.mode == "RGB" and im.size == (32, 32)
    assert im.getpixel((24, 16)) == (255, 255, 255)  # transparent: white, not the black underneath
    assert im.getpixel((4, 16)) == (200, 10, 10)  # opaque: unchanged


def test_palette_png(files):
    im = load_image(files["palette.jpg"])
    assert im.mode == "RGB" and im.size == (20, 10)
    assert im.getpixel((2, 2)) == (10, 200, 30) and im.getpixel((15, 2)) == (0, 0, 0)


def test_other_transparency_forms_are_composited():
    la = Image.new("LA", (4, 4), (100, 0))
    assert decode_image(_encode(la, "PNG"), "la").getpixel((0, 0)) == (255, 255, 255)
    rgb_trns = Image.new("RGB", (4, 4), (0, 0, 0))
    rgb_trns.putpixel((0, 0), (0, 255, 0))
    out = decode_image(_encode(rgb_trns, "PNG", transparency=(0, 0, 0)), "trns")
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 255, 0)


def test_16_bit_grayscale_is_rescaled_not_clipped():
    wide = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    r, g, b = decode_image(_encode(wide, "PNG"), "w16").getpixel((0, 0))
    assert r == g == b and 120 <= r <= 135  # mid-grey, where plain convert() would give 255


def test_truncated_jpeg(files):
    with pytest.raises(BadImageError) as e:
        load_image(files["truncated.jpg"], name="data/5.jpg")
    assert e.value.kind == "truncated" and e.value.name == "data/5.jpg"
    assert e.value.reason.startswith("truncated image (")
    assert str(e.value).startswith("data/5.jpg: truncated image (") and str(e.value).endswith("; skipped")
    # The header alone parses, which is why only a full decode catches this.
    assert read_header(open(files["truncated.jpg"], "rb").read(), "t")["format"] == "JPEG"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_garbage(files):
    with pytest.raises(BadImageError) as e:
        load_image(files["garbage.jpg"])
    assert e.value.kind == "not_image" and e.value.reason.startswith("not an image")
    with pytest.raises(BadImageError):
        read_header(open(files["garbage.jpg"], "rb").read(), "garbage.jpg")


@pytest.mark.parametrize("data,what", [
    (b"<html><body>403 Forbidden</body></html>", "HTML page"),
    (b"  <!DOCTYPE html><html>secret</html>", "HTML page"),
    (b"root:x:0:0:root:/root:/bin/bash\n", "plain text"),
    (b"%PDF-1.7 secret", "PDF"),
    (b"PK\x03\x04secret", "ZIP"),
    (b'{"token": "secret"}', "JSON or other text"),
    (bytes(range(256)) * 4, "binary data"),
])
def test_a_file_that_is_no_image_is_described_never_shown(data, what):
    """The reason says what the file looks like; its bytes never reach a message (the file may be anything)."""
    with pytest.raises(BadImageError) as e:
        decode_image(data, "x.jpg")
    assert what in e.value.reason and e.value.kind == "not_image"
    for shown in ("secret", "root:x", "403", "\\x", "b'"):
        assert shown not in str(e.value)


def test_empty_file(files):
    with pytest.raises(BadImageError) as e:
        load_image(files["empty.jpg"])
    assert e.value.kind == "empty" and e.value.reason == "empty file"
    with pytest.raises(BadImageError):
        read_header(b"", "empty.jpg")


def test_missing_file(tmp_path):
    with pytest.raises(BadImageError) as e:
        load_image(str(tmp_path / "nope.jpg"), name="data/nope.jpg")
    assert e.value.reason == "missing" and e.value.kind == "missing"
    assert str(e.value) == "data/nope.jpg: missing; skipped"


def test_decompression_bomb_refused_from_header(files, monkeypatch):
    decodes = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        decodes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    pil_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImageError) as e:
        load_image(files["bomb.jpg"], max_pixels=1_000_000)
    assert e.value.kind == "too_large" and e.value.reason.startswith("decompression bomb")
    assert "4000x4000" in e.value.reason
    assert decodes == []  # refused from the header: no pixel buffer was ever allocated
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # and PIL's global was left alone

    data = open(files["bomb.jpg"], "rb").read()
    with pytest.raises(BadImageError):
        read_header(data, "bomb.jpg", max_pixels=1_000_000)
    assert read_header(data, "bomb.jpg") == {"format": "PNG", "width": 4000, "height": 4000, "mode": "L"}
    assert decodes == []

    decode_image(_encode(Image.new("L", (3, 2), 0), "PNG"), "small")
    assert set(decodes) == {(3, 2)}  # the spy does see real decodes, so the empty list above means something


def test_default_limit_accepts_a_large_photo_size():
    # 16 Mpx is far under the 50 Mpx default: only the explicit limit above refuses it.
    assert images.DEFAULT_MAX_PIXELS >= 48_000_000
    big = decode_image(_encode(Image.new("L", (4000, 4000), 0), "PNG"), "big")
    assert big.size == (4000, 4000) and big.mode == "RGB"


def test_read_header_does_not_decode(files):
    head = read_header(open(files["cmyk.jpg"], "rb").read(), "cmyk.jpg")
    assert head == {"format": "JPEG", "width": 16, "height": 16, "mode": "CMYK"}


def test_load_image_through_memory_url():
    from mlc.io import storage

    url = "memory://mlc-test-images/data/0.jpg"
    storage.write_bytes(url, _encode(Image.new("RGB", (5, 7), (1, 2, 3)), "PNG"))
    assert load_image(url).size == (5, 7)
    with pytest.raises(BadImageError) as e:
        load_image("memory://mlc-test-images/data/404.jpg")
    assert e.value.reason == "missing"


def test_error_survives_pickling():
    # DataLoader workers and Ray tasks send exceptions back pickled.
    err = pickle.loads(pickle.dumps(BadImageError("data/5.jpg", "truncated image (x)", "truncated")))
    assert (err.name, err.reason, err.kind) == ("data/5.jpg", "truncated image (x)", "truncated")
    assert str(err) == "data/5.jpg: truncated image (x); skipped"
    assert isinstance(err, ValueError)
