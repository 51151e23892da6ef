"""mlc.data.demo: the synthetic dataset must be deterministic, cached, and in the real files' exact format."""

from __future__ import annotations

import collections
import json
import os
import re

import pytest

from mlc.data import demo
from mlc.io import storage
from mlc.data.demo import DEMO_CLASSES, default_demo_root, make_demo_dataset
from mlc.io.images import decode_image, read_header

# Small sizes keep the tests fast; they still contain every quirk.
SMALL = dict(n_train=60, n_test=20, image_size=48, seed=3)

# A row of the real format: ImageID, labels (optional: test.csv has none), a
# quoted caption that may contain quotes and newlines and runs to the end of
# the line. Non-greedy up to `"` + end-of-line, which is where the real file's
# closing quote always sits. A stand-in until mlc.data.table.read_table lands.
TRAIN_ROW = re.compile(r'^(\d+\.jpg),([\d ]+),"(.*?)"$', re.M | re.S)
TEST_ROW = re.compile(r'^(\d+\.jpg),"(.*?)"$', re.M | re.S)


def _tree(root: str) -> dict:
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_demo_dataset(str(tmp_path_factory.mktemp("demo")), **SMALL)


def _rows(root: str, name: str, pattern):
    raw = open(os.path.join(root, name), "rb").read().decode("utf-8")
    body = raw.split("\n", 1)[1]
    rows = pattern.findall(body)
    # Every byte of the body is accounted for by the rows: nothing the regex skipped.
    rebuilt = "".join(",".join(r[:-1]) + f',"{r[-1]}"\n' for r in rows)
    assert rebuilt == body
    return raw, rows


def test_deterministic_byte_for_byte(tmp_path):
    a = make_demo_dataset(str(tmp_path / "a"), **SMALL)
    b = make_demo_dataset(str(tmp_path / "b"), **SMALL)
    ta, tb = _tree(a), _tree(b)
    assert ta.keys() == tb.keys() and all(ta[k] == tb[k] for k in ta)
    c = make_demo_dataset(str(tmp_path / "c"), **{**SMALL, "seed": 4})
    assert _tree(c)["train.csv"] != ta["train.csv"]


def test_layout_and_headers(small):
    names = sorted(os.listdir(small))
    assert names == sorted([".complete", ".mlc-demo", "data", "test.csv", "test_labels.csv", "train.csv"])
    total = SMALL["n_train"] + SMALL["n_test"]
    assert sorted(os.listdir(os.path.join(small, "data"))) == sorted(f"{i}.jpg" for i in range(total))
    for name, header in [("train.csv", "ImageID,Labels,Caption"), ("test.csv", "ImageID,Caption"),
                         ("test_labels.csv", "ImageID,Labels,Caption")]:
        raw = open(os.path.join(small, name), "rb").read()
        assert raw.startswith(header.encode() + b"\n") and raw.endswith(b'."\n')

    _, train = _rows(small, "train.csv", TRAIN_ROW)
    _, test = _rows(small, "test.csv", TEST_ROW)
    _, truth = _rows(small, "test_labels.csv", TRAIN_ROW)
    assert [r[0] for r in train] == [f"{i}.jpg" for i in range(SMALL["n_train"])]
    # Test ids continue after train, and the truth file describes the same rows and captions.
    assert [r[0] for r in test] == [f"{i}.jpg" for i in range(SMALL["n_train"], total)]
    assert [(r[0], r[2]) for r in truth] == test


def test_every_image_decodes_at_the_requested_size(small):
    data = os.path.join(small, "data")
    for name in os.listdir(data):
        raw = open(os.path.join(data, name), "rb").read()
        assert read_header(raw, name)["format"] == "JPEG"
        im = decode_image(raw, name)
        assert im.mode == "RGB" and im.size == (SMALL["image_size"], SMALL["image_size"])


def test_labels_are_known_ids_uneven_and_unsorted(tmp_path):
    root = make_demo_dataset(str(tmp_path / "d"), n_train=400, n_test=10, image_size=32)
    _, rows = _rows(root, "train.csv", TRAIN_ROW)
    label_lists = [[int(v) for v in r[1].split()] for r in rows]
    assert all(1 <= len(ls) <= 3 and len(set(ls)) == len(ls) for ls in label_lists)
    counts = collections.Counter(v for ls in label_lists for v in ls)
    assert set(counts) == set(DEMO_CLASSES)
    assert counts[1] == max(counts.values()) and counts[1] > 2 * min(counts.values())
    assert any(ls != sorted(ls) for ls in label_lists)  # written in random order, as in the real file
    # Captions name exactly the labelled objects.
    for ls, (_, _, caption) in zip(label_lists, rows):
        clean = caption.replace('"', "").replace("\n", " ")
        named = {k for k, (colour, shape, _) in DEMO_CLASSES.items() if f"{colour} {shape}" in clean}
        assert named == set(ls)


def test_caption_quirks_are_in_the_raw_bytes(small):
    raw, rows = _rows(small, "train.csv", TRAIN_ROW)
    inner_quotes = [c for _, _, c in rows if '"' in c]
    multi_line = [c for _, _, c in rows if "\n" in c]
    assert inner_quotes and multi_line
    assert all(re.search(r' "[a-z]+" ', c) for c in inner_quotes)  # unescaped, never doubled
    assert '""' not in raw
    assert len(raw.splitlines()) > SMALL["n_train"] + 1  # a row spans two physical lines
    assert any("," in c for _, _, c in rows)  # commas inside quoted captions
    _, test = _rows(small, "test.csv", TEST_ROW)
    assert any('"' in c for _, c in test) and any("\n" in c for _, c in test)


def test_rerun_with_marker_skips(small):
    csv_path = os.path.join(small, "train.csv")
    img_path = os.path.join(small, "data", "0.jpg")
    before = (os.stat(csv_path).st_mtime_ns, os.stat(img_path).st_mtime_ns)
    assert make_demo_dataset(small, **SMALL) == small
    assert (os.stat(csv_path).st_mtime_ns, os.stat(img_path).st_mtime_ns) == before
    marker = json.loads(open(os.path.join(small, ".complete")).read())
    assert {k: marker[k] for k in SMALL} == SMALL


def test_missing_marker_regenerates(tmp_path):
    root = make_demo_dataset(str(tmp_path / "d"), **SMALL)
    original = _tree(root)
    os.remove(os.path.join(root, ".complete"))
    os.remove(os.path.join(root, "data", "7.jpg"))  # as if the first run had died part way
    with open(os.path.join(root, "train.csv"), "wb") as f:
        f.write(b"ImageID,Labels,Caption\n0.jpg,1,")
    make_demo_dataset(root, **SMALL)
    assert _tree(root) == original


def test_other_parameters_regenerate_and_drop_stale_images(tmp_path):
    root = make_demo_dataset(str(tmp_path / "d"), **SMALL)
    smaller = {**SMALL, "n_test": 5}
    make_demo_dataset(root, **smaller)
    total = smaller["n_train"] + smaller["n_test"]
    assert len(os.listdir(os.path.join(root, "data"))) == total
    fresh = make_demo_dataset(str(tmp_path / "fresh"), **smaller)
    assert _tree(root) == _tree(fresh)


def test_images_do_not_depend_on_split_sizes(tmp_path):
    a = make_demo_dataset(str(tmp_path / "a"), n_train=10, n_test=2, image_size=32)
    b = make_demo_dataset(str(tmp_path / "b"), n_train=20, n_test=0, image_size=32)
    for i in range(12):
        assert _tree(a)[f"data/{i}.jpg"] == _tree(b)[f"data/{i}.jpg"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "train.csv").write_text("ImageID,Labels,Caption\n0.jpg,1,\"precious\"\n")
    with pytest.raises(FileExistsError):
        make_demo_dataset(str(real), **SMALL)
    assert "precious" in (real / "train.csv").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    make_demo_dataset(str(empty), **SMALL)  # an existing empty folder is fine


def test_works_on_a_memory_url():
    root = "memory://mlc-test-demo/demo"
    assert make_demo_dataset(root, n_train=12, n_test=3, image_size=32) == root
    assert storage.exists(storage.join(root, "data", "14.jpg"))
    assert storage.read_bytes(storage.join(root, "test.csv")).startswith(b"ImageID,Caption\n")


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MLC_CACHE_DIR", str(tmp_path / "cache"))
    assert default_demo_root() == os.path.join(str(tmp_path / "cache"), f"demo-v{demo.DEMO_VERSION}")
    monkeypatch.delenv("MLC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_demo_root() == os.path.join(str(tmp_path / "xdg"), "mlc", "demo-v1")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_demo_root() == os.path.join(str(tmp_path / "home"), ".cache", "mlc", "demo-v1")
    monkeypatch.setenv("MLC_CACHE_DIR", str(tmp_path / "cache"))
    root = make_demo_dataset(n_train=5, n_test=1, image_size=16)
    assert root == default_demo_root() and os.path.exists(os.path.join(root, ".complete"))


def test_bad_parameters():
    with pytest.raises(ValueError):
        make_demo_dataset("memory://mlc-test-demo/bad", n_train=0)
    with pytest.raises(ValueError):
        make_demo_dataset("memory://mlc-test-demo/bad", image_size=8)


def test_default_size_is_fast_enough(tmp_path):
    import time

    start = time.perf_counter()
    make_demo_dataset(str(tmp_path / "full"))
    assert time.perf_counter() - start < 15  # ~1 s normally; generous for a loaded CI machine
