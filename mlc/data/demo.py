"""A small synthetic dataset in exactly the COMP5329 format, generated on demand.

The project has to run end to end (tests, a smoke training run, a demo for a new
team member) on a fresh machine with no network access and without the real
data, which is large and not ours to redistribute. So instead of shipping data
we ship a deterministic generator: :func:`make_demo_dataset` writes

* ``train.csv``        ``ImageID,Labels,Caption``
* ``test.csv``         ``ImageID,Caption``
* ``test_labels.csv``  the hidden truth for the test rows, in train.csv's format,
                       so demo predictions can be scored
* ``data/<n>.jpg``     the images, numbered 0.. for train and continuing for test

in the same byte-level format as the real files, including the quirks a parser
must survive: every caption wrapped in double quotes, a few captions with
*unescaped* inner quotes (``"A "red" disc and a blue square."``), commas inside
captions, captions spanning two lines, labels in unsorted order, and class ids
that are integers but neither contiguous nor starting at 0.

Each image shows one to three objects, each class a distinct shape in a
distinct colour on a mildly noisy, low-saturation background, so that a
ResNet50 trained from scratch on a CPU for a couple of minutes at 64 px learns
it well. That makes the demo a meaningful smoke test: a pipeline bug (labels
shuffled against images, classes mapped to the wrong columns, thresholds
inverted) shows up as an F1 near the trivial baseline instead of near 1.
"""

from __future__ import annotations

import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw

from mlc.io import storage

# Bumped whenever the generated content changes, so an old cached copy is
# regenerated rather than silently reused (it is part of the marker and of the
# default folder name).
DEMO_VERSION = 1

# Class id -> (colour name, shape name, RGB). The ids are a non-contiguous subset
# of the real set's ids (1-19, 12 absent) so that code which assumes ids are
# 0-based or contiguous (num_classes = max id, or id used as a column index)
# fails on the demo exactly as it would on the real data, while any code that
# hard-codes the real set's id list still accepts them. 10 and 16 are two-digit,
# so sorting ids as strings ("10" < "3") gives a different order than as ints.
# Colours are far apart in hue and saturated, against a grey-ish background.
DEMO_CLASSES: dict[int, tuple[str, str, tuple[int, int, int]]] = {
    1: ("red", "disc", (220, 30, 30)),
    3: ("blue", "square", (30, 70, 225)),
    4: ("green", "triangle", (30, 175, 50)),
    7: ("yellow", "ring", (240, 215, 30)),
    10: ("magenta", "cross", (215, 40, 205)),
    16: ("cyan", "bar", (30, 205, 215)),
}
_IDS = np.array(list(DEMO_CLASSES), dtype=np.int64)

# Relative weight of each class when objects are drawn (without replacement),
# in DEMO_CLASSES order. Uneven on purpose, like the real set where label 1
# ("person") is in most images: class 1 ends up in ~58% of images and the rarest
# (16) in ~16%, so class-imbalance handling is exercised, yet with the default
# 800 training images even the rarest class has ~130 positives to learn from.
# Predicting the most common label set ({1}) for every image scores a
# samples-F1 of only ~0.42, so a working pipeline stands out clearly.
_CLASS_WEIGHTS = np.array([0.40, 0.17, 0.14, 0.11, 0.10, 0.08])

# How many objects an image holds (1, 2 or 3) and how likely each count is.
# Mostly one or two, like the real set (~1.4 labels per image on average).
_OBJECT_COUNTS = np.array([1, 2, 3])
_OBJECT_COUNT_P = np.array([0.45, 0.35, 0.20])

# Object size as a fraction of the image side: at 64 px, 14-26 px. Big enough to
# be unambiguous after the usual resize/crop augmentations, small enough that
# three fit side by side without overlapping.
_MIN_SIZE_FRAC, _MAX_SIZE_FRAC = 0.22, 0.40

# Standard deviation of the per-pixel Gaussian noise, in 0-255 units: visible
# but far below the contrast between objects and background, so the network has
# to be robust to texture without the task becoming hard.
_NOISE_SIGMA = 6.0

# Fraction of captions given unescaped inner quotes. The real train.csv has such
# rows; ~5% means even a 40-row test dataset has a couple.
_QUOTED_FRACTION = 0.05

# JPEG quality for the images: high enough that compression blur does not
# shift colours between classes, and fixed so the bytes are deterministic.
_JPEG_QUALITY = 90

# Files are written concurrently: local writes fsync each file, and object
# stores pay a round trip per object, so one at a time is slow for 1,000 files.
_WRITE_THREADS = 8

_MARKER = ".complete"  # written last: its presence means the folder is whole
_OWNER = ".mlc-demo"  # written first: marks the folder as ours to overwrite
_IMAGE_NAME = re.compile(r"^(\d+)\.jpg$")


def default_demo_root() -> str:
    """Where the demo lives unless told otherwise: a per-user cache, not the repo.

    ``$MLC_CACHE_DIR`` (may be a URL, e.g. a bucket shared by a Ray cluster),
    else ``$XDG_CACHE_HOME/mlc`` (only if absolute, as the XDG spec says), else
    ``~/.cache/mlc``; then ``demo-v<version>``.
    """
    base = os.environ.get("MLC_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = os.path.join(xdg, "mlc") if xdg and os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache", "mlc")
    return storage.join(base, f"demo-v{DEMO_VERSION}")


def _marker_content(n_train: int, n_test: int, image_size: int, seed: int) -> dict:
    # Everything that determines the output bytes, plus the class table so a
    # person looking at the folder can see what the ids mean.
    return {
        "generator": "mlc.demo",  # the marker's old name: a cache written before mlc/data/ stays valid
        "version": DEMO_VERSION,
        "n_train": n_train,
        "n_test": n_test,
        "image_size": image_size,
        "seed": seed,
        "classes": {str(k): f"{c} {s}" for k, (c, s, _) in DEMO_CLASSES.items()},
    }


def _is_complete(root: str, expected: dict) -> bool:
    marker = storage.join(root, _MARKER)
    if not storage.exists(marker):
        return False
    try:
        return json.loads(storage.read_bytes(marker).decode("utf-8")) == expected
    except (ValueError, UnicodeDecodeError):
        return False  # an unreadable marker is as good as none


def _check_ours(root: str) -> None:
    """Refuse to write into a non-empty folder we did not create.

    The demo files have the real dataset's names, so pointing ``root`` at the
    real data (an easy slip: both are "a dataset root") would otherwise
    overwrite the real ``train.csv``.
    """
    if not storage.exists(root):
        return
    try:
        names = storage.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return
    if names and _OWNER not in names and _MARKER not in names:
        raise FileExistsError(
            f"{root} already holds files that mlc.data.demo did not write ({', '.join(names[:5])}...); "
            "refusing to overwrite them: choose an empty or new folder for the demo dataset"
        )


def _place(rng: np.random.Generator, sizes: list[int], side: int) -> list[tuple[int, int, int]]:
    """Non-overlapping boxes ``(x, y, size)`` so every object stays fully visible.

    Occlusion would make some labels invisible in the pixels, i.e. label noise
    that slows learning for no benefit in a smoke-test dataset. Rejection
    sampling with a bounded number of tries; if a box will not fit it shrinks,
    and as a last resort it may overlap (still deterministic).
    """
    boxes: list[tuple[int, int, int]] = []
    gap = 2
    for size in sizes:
        placed = None
        for attempt in range(60):
            if attempt and attempt % 20 == 0:
                size = max(6, int(size * 0.8))
            x = int(rng.integers(1, side - size))
            y = int(rng.integers(1, side - size))
            if all(x + size + gap <= bx or bx + bs + gap <= x or y + size + gap <= by or by + bs + gap <= y for bx, by, bs in boxes):
                placed = (x, y, size)
                break
        boxes.append(placed or (x, y, size))
    return boxes


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, s: int, colour: tuple, rng: np.random.Generator) -> None:
    x1, y1 = x + s - 1, y + s - 1
    if shape == "disc":
        draw.ellipse([x, y, x1, y1], fill=colour)
    elif shape == "square":
        inset = s // 10  # a square slightly smaller than its box, so its area is close to the disc's
        draw.rectangle([x + inset, y + inset, x1 - inset, y1 - inset], fill=colour)
    elif shape == "triangle":
        draw.polygon([(x + s / 2, y), (x, y1), (x1, y1)], fill=colour)
    elif shape == "ring":
        draw.ellipse([x, y, x1, y1], outline=colour, width=max(2, s // 5))
    elif shape == "cross":
        t = max(2, s // 3)
        a = x + (s - t) // 2
        b = y + (s - t) // 2
        draw.rectangle([x, b, x1, b + t - 1], fill=colour)
        draw.rectangle([a, y, a + t - 1, y1], fill=colour)
    elif shape == "bar":
        t = max(3, s // 3)  # thick enough to survive downscaling augmentations
        offset = (s - t) // 2
        if rng.integers(2):
            draw.rectangle([x, y + offset, x1, y + offset + t - 1], fill=colour)
        else:
            draw.rectangle([x + offset, y, x + offset + t - 1, y1], fill=colour)
    else:  # pragma: no cover - DEMO_CLASSES and this function are edited together
        raise ValueError(f"unknown shape {shape!r}")


def _sample(seed: int, index: int, image_size: int) -> tuple[list[int], bytes, list[str]]:
    """Labels (in drawing order, i.e. unsorted), JPEG bytes and object phrases of image ``index``.

    Each image has its own generator seeded by ``(seed, index)``, so image 5 is
    the same whatever ``n_train``/``n_test`` are: a bigger demo extends a
    smaller one instead of reshuffling it.
    """
    rng = np.random.default_rng([seed, index])
    k = int(rng.choice(_OBJECT_COUNTS, p=_OBJECT_COUNT_P))
    labels = [int(v) for v in rng.choice(_IDS, size=k, replace=False, p=_CLASS_WEIGHTS)]

    # A grey with a slight random tint: varied backgrounds, but never
    # saturated enough to be mistaken for one of the class colours.
    base = rng.uniform(90, 170) + rng.normal(0, 10, size=3)
    img = Image.new("RGB", (image_size, image_size), tuple(int(v) for v in np.clip(base, 0, 255)))
    draw = ImageDraw.Draw(img)
    lo, hi = round(_MIN_SIZE_FRAC * image_size), round(_MAX_SIZE_FRAC * image_size)
    sizes = [int(rng.integers(lo, hi + 1)) for _ in labels]
    for label, (x, y, s) in zip(labels, _place(rng, sizes, image_size)):
        _, shape, colour = DEMO_CLASSES[label]
        jitter = rng.integers(-20, 21, size=3)  # so colour is a range, not one exact value to memorise
        _draw(draw, shape, x, y, s, tuple(int(v) for v in np.clip(np.array(colour) + jitter, 0, 255)), rng)

    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, _NOISE_SIGMA, size=(image_size, image_size, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB").save(out, "JPEG", quality=_JPEG_QUALITY)

    # Captions mention the objects in their own random order, not the labels',
    # like a human description would.
    phrases = [f"a {DEMO_CLASSES[v][0]} {DEMO_CLASSES[v][1]}" for v in labels]
    order = rng.permutation(len(phrases))
    return labels, out.getvalue(), [phrases[i] for i in order]


def _caption(phrases: list[str], template: int, quoted: bool, split: bool) -> str:
    """Build one caption; ``quoted`` puts inner quotes around a colour, ``split`` a newline in the middle.

    Inner quotes always sit between spaces (``A "red" disc``), never next to a
    comma or the field's own quotes, matching the real file's quirk: those
    quotes are unescaped, and a quote right beside the delimiter would make
    even the real set ambiguous.
    """
    if quoted:
        colour, rest = phrases[0][2:].split(" ", 1)  # "a red disc" -> "red", "disc"
        phrases = [f'a "{colour}" {rest}'] + phrases[1:]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    text = ["{}.", "There is {}.", "{} on a plain background.", "A picture of {}."][template].format(listed)
    text = text[0].upper() + text[1:]
    if split:
        words = text.split(" ")
        half = len(words) // 2
        text = " ".join(words[:half]) + "\n" + " ".join(words[half:])
    return text


def _special_rows(rng: np.random.Generator, n: int, n_newlines: int) -> tuple[set, set]:
    """Which rows get inner quotes and which a line break (disjoint, at least one of each when n allows)."""
    if n == 0:
        return set(), set()
    n_quoted = min(n, max(1, round(_QUOTED_FRACTION * n)))
    picked = [int(v) for v in rng.permutation(n)]
    quoted = set(picked[:n_quoted])
    newlines = set(picked[n_quoted:n_quoted + n_newlines])
    return quoted, newlines


def _csv(header: str, rows: list[tuple]) -> bytes:
    # Written by hand, not with the csv module: the real file does not escape
    # inner quotes, and csv would (as ""), which is exactly the quirk we need.
    lines = [header] + [",".join(list(r[:-1]) + [f'"{r[-1]}"']) for r in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


def make_demo_dataset(
    root: str | None = None,
    n_train: int = 800,
    n_test: int = 200,
    image_size: int = 64,
    seed: int = 0,
) -> str:
    """Write (or reuse) the synthetic dataset under ``root`` and return the root URL.

    Defaults: 800 train / 200 test images keep generation to about a second
    and training on a CPU to minutes while giving every class 100+ training
    positives; 64 px is large enough for the shapes to be unambiguous and small
    enough for a ResNet50 to train on a CPU.

    Idempotent: a ``.complete`` marker holding the parameters is written last,
    and a call whose parameters match it returns at once. A folder without a
    matching marker (an interrupted run, or other parameters) is regenerated.
    Output is byte-for-byte deterministic for given parameters, which also
    makes two processes generating the same folder at once harmless: they
    write identical bytes, each file atomically.
    """
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 px to draw three distinguishable shapes, got {image_size}")
    root = default_demo_root() if root is None else str(root)
    expected = _marker_content(n_train, n_test, image_size, seed)
    if _is_complete(root, expected):
        return root

    _check_ours(root)
    storage.write_bytes(storage.join(root, _OWNER), b"Generated by mlc.demo; safe to delete.\n")
    storage.remove(storage.join(root, _MARKER))  # stale parameters: the folder is incomplete until we finish

    train_rows, test_rows = _write_images(root, n_train, n_test, image_size, seed)
    _remove_stale_images(root, n_train + n_test)
    storage.write_bytes(storage.join(root, "train.csv"), _csv("ImageID,Labels,Caption", train_rows))
    storage.write_bytes(storage.join(root, "test.csv"), _csv("ImageID,Caption", [(r[0], r[2]) for r in test_rows]))
    storage.write_bytes(storage.join(root, "test_labels.csv"), _csv("ImageID,Labels,Caption", test_rows))
    storage.write_bytes(storage.join(root, _MARKER), (json.dumps(expected, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return root


def _write_images(root: str, n_train: int, n_test: int, image_size: int, seed: int) -> tuple[list, list]:
    """Every image under ``root/data`` (written by a few threads), and the train and test tables' rows."""
    total = n_train + n_test
    rng = np.random.default_rng(seed)
    # One or two multi-line captions in train (two once there are enough rows
    # that two in a row is not the whole file) and one in test.
    train_quoted, train_split = _special_rows(rng, n_train, 2 if n_train >= 100 else 1)
    test_quoted, test_split = _special_rows(rng, n_test, 1)
    templates = rng.integers(0, 4, size=total)
    train_rows, test_rows = [], []
    with ThreadPoolExecutor(max_workers=_WRITE_THREADS) as pool:
        futures = []
        for i in range(total):
            labels, jpeg, phrases = _sample(seed, i, image_size)
            image_id = f"{i}.jpg"
            futures.append(pool.submit(storage.write_bytes, storage.join(root, "data", image_id), jpeg))
            j, quoted, split = (i, train_quoted, train_split) if i < n_train else (i - n_train, test_quoted, test_split)
            caption = _caption(phrases, int(templates[i]), j in quoted, j in split)
            (train_rows if i < n_train else test_rows).append((image_id, " ".join(map(str, labels)), caption))
        for f in futures:
            f.result()  # re-raise the first write error, if any
    return train_rows, test_rows


def _remove_stale_images(root: str, total: int) -> None:
    """Images left by an earlier, larger run would be listed nowhere but would still sit in data/; remove only
    files with our own naming pattern."""
    data_dir = storage.join(root, "data")
    for name in storage.listdir(data_dir):
        m = _IMAGE_NAME.match(name)
        if m and int(m.group(1)) >= total:
            storage.remove(storage.join(data_dir, name))


__all__ = ["DEMO_CLASSES", "DEMO_VERSION", "default_demo_root", "make_demo_dataset"]

# With no --data the job trains on the embedded demo set, offline, on a CPU in a few minutes: no ImageNet
# download, small images, and the whole network trains (from scratch there is nothing worth freezing).
DEMO_DEFAULTS = {
    "output": "runs/demo",
    # The demo shows the image pipeline. Its captions are generated from the labels ("a red disc and a blue
    # square"), so a caption model scores 1.0 on them and would show nothing (mlc.data.demo.with_demo_data).
    "inputs": "image",
    "weights": "none",
    "unfrozen_depth": 4,
    "dropout": 0.0,
    "image_size": 64,      # the demo images are 64 px; ResNet50 at 64 px trains at ~60 img/s on 2 CPU cores
    "epochs": 6,
    "lr": 2e-3,
    "warmup_epochs": 0.5,
    # bce: image-only from scratch scored lower with asl, the default chosen on captioned data (compare_recipes).
    "loss": "bce",
    # fp32: training this small network from scratch under CPU bf16 autocast lost accuracy, measured on the
    # 2-core dev CPU (best validation F1 0.890 vs 0.957 with seed 0, 0.890 vs 0.963 with seed 1), although
    # bf16 steps were faster there. Fine-tuning ImageNet weights in bf16 is the usual practice on GPUs.
    "amp": "off",
}


def with_demo_data(cfg, log=print):
    """``cfg`` itself when it names a dataset; otherwise ``cfg`` on the embedded demo dataset (made once, offline,
    into the cache). Every way of training (local, Ray Train, Ray Tune) starts here when --data is absent."""
    if cfg.data is not None:
        return cfg
    cfg = cfg.replace(data=make_demo_dataset())
    log(f"no --data given: using the embedded demo dataset at {cfg.data}")
    if cfg.inputs == "auto":
        # The demo shows the image pipeline: its captions are generated from the labels ("a red disc"), so a
        # network that reads them scores 1.0 and shows nothing. --inputs caption|image+caption still can.
        cfg = cfg.replace(inputs="image")
    return cfg
