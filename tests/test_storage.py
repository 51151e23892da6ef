"""mlc.io.storage, mlc.io.fetch and the batched loader path without a server: local and memory:// URLs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mlc.distributed.ray_folder import pyarrow_filesystem
from mlc.io import fetch, storage
from mlc.data.sources import StreamTable
from mlc.io.storage import AccessDenied, ObjectNotFound, StorageError
from mlc.data.transforms import train_transform


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "out")
        return
    url = f"memory://mlc-test-{os.getpid()}-{id(request)}"
    yield url
    storage.remove(url, recursive=True)


def test_round_trip_and_listing(root):
    storage.write_text(storage.join(root, "a", "x.txt"), "hello")
    storage.write_bytes(storage.join(root, "a", "y.bin"), b"\x00\x01")
    assert storage.read_bytes(storage.join(root, "a", "x.txt")) == b"hello"
    assert storage.listdir(storage.join(root, "a")) == ["x.txt", "y.bin"]
    assert storage.exists(storage.join(root, "a", "y.bin")) and storage.isdir(storage.join(root, "a"))
    got = storage.read_many([storage.join(root, "a", "x.txt"), storage.join(root, "a", "nope")])
    assert got[storage.join(root, "a", "x.txt")] == b"hello"
    assert isinstance(got[storage.join(root, "a", "nope")], ObjectNotFound)
    storage.remove(storage.join(root, "a"), recursive=True)
    assert not storage.exists(storage.join(root, "a", "x.txt"))


def test_missing_object_is_a_named_file_not_found(root):
    url = storage.join(root, "missing.csv")
    with pytest.raises(FileNotFoundError, match="missing.csv: no such file or object"):
        storage.read_bytes(url)
    with pytest.raises(ObjectNotFound):
        storage.read_bytes(url)


def test_an_exception_inside_writer_publishes_nothing_and_keeps_the_old_object(root):
    url = storage.join(root, "run", "metrics.json")
    with storage.writer(url) as f:
        f.write(b'{"epoch": 1}')
    assert storage.read_bytes(url) == b'{"epoch": 1}'
    with pytest.raises(RuntimeError, match="boom"):
        with storage.writer(url) as f:
            f.write(b'{"epoch": 2, "half')
            raise RuntimeError("boom")
    assert storage.read_bytes(url) == b'{"epoch": 1}'
    with pytest.raises(RuntimeError):
        with storage.writer(storage.join(root, "run", "never.json")) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert not storage.exists(storage.join(root, "run", "never.json"))


def test_local_write_leaves_no_temporary_files(tmp_path):
    storage.write_bytes(str(tmp_path / "f.bin"), b"x" * 1000)
    assert os.listdir(tmp_path) == ["f.bin"]


def test_check_writable_local(tmp_path):
    (tmp_path / "there").mkdir()
    storage.check_writable(str(tmp_path / "there"))
    assert os.listdir(tmp_path / "there") == []  # the probe is gone
    # Folders the check had to create are removed again: a run that fails before writing leaves none behind.
    storage.check_writable(str(tmp_path / "new" / "run"))
    assert os.listdir(tmp_path) == ["there"]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(StorageError, match=r"a-file is a file, not a folder"):
        storage.check_writable(str(tmp_path / "a-file"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=r"output location .*file/run is not writable.*Nothing was trained"):
        storage.check_writable(str(tmp_path / "file" / "run"))


def test_safe_url_hides_credentials():
    assert storage.safe_url("https://user:secret@host/a/b?X-Goog-Signature=abc") == "https://host/a/b"
    assert storage.safe_url("gs://bucket/key") == "gs://bucket/key"
    e = storage._named("https://user:secret@host/x?token=t", PermissionError("denied"), "read")
    assert isinstance(e, AccessDenied) and "secret" not in str(e) and "token=t" not in str(e)


def test_pyarrow_filesystem(tmp_path):
    import pyarrow.fs as pafs
    fs, path = pyarrow_filesystem(str(tmp_path / "ray"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "ray")
    storage.write_text("memory://mlc-pa/x.txt", "hi")
    fs, path = pyarrow_filesystem("memory://mlc-pa")
    assert isinstance(fs, pafs.PyFileSystem)
    with fs.open_input_stream(path + "/x.txt") as f:
        assert f.read() == b"hi"
    storage.remove("memory://mlc-pa", recursive=True)


def test_byte_cache(tmp_path, monkeypatch):
    cache = fetch.ByteCache(str(tmp_path / "c"), max_bytes=100)
    assert cache.get("gs://b/x") is None
    assert cache.put("gs://b/x", b"a" * 60) and cache.get("gs://b/x") == b"a" * 60
    assert not cache.put("gs://b/y", b"b" * 60)  # over the limit: not stored, never an error
    assert cache.get("gs://b/y") is None
    files = [f for _, _, fs in os.walk(tmp_path / "c") for f in fs]
    assert len(files) == 1 and not files[0].startswith(".tmp")
    assert fetch.cacheable("gs://b/x") and not fetch.cacheable("/data/x.jpg")
    assert not fetch.cacheable("memory://x") and not fetch.cacheable("file:///x")
    monkeypatch.setenv("MLC_BYTE_CACHE", "off")
    assert fetch.default_cache() is None
    monkeypatch.setenv("MLC_BYTE_CACHE", str(tmp_path / "d"))
    assert fetch.default_cache().root == str(tmp_path / "d")


def _images(tmp_path, n=10):
    from PIL import Image
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    names = []
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(folder / f"{k}.jpg", quality=90)
        names.append(f"{k}.jpg")
    (folder / "corrupt.jpg").write_bytes(b"<html>not an image</html>")
    return folder, names + ["corrupt.jpg", "missing.jpg"]


def test_a_batch_of_rows_equals_its_rows_one_by_one(tmp_path):
    """A batch (what the DataLoader asks a source for) holds exactly the rows read one at a time: the same
    per-row seeded augmentation, the same skipped rows naming the bad and the missing image."""
    folder, names = _images(tmp_path)
    ds = StreamTable([str(folder / n) for n in names], np.eye(len(names), dtype=np.float32)[:, :3],
                     train_transform(24), 50_000_000)
    ds.set_epoch(seed=3, epoch=2)
    order = [11, 4, 10, 0, 7, 3]
    torch.manual_seed(123)
    batched = ds.batch(order)
    state = torch.get_rng_state()
    torch.manual_seed(123)
    single = [ds.batch([i]) for i in order]
    assert torch.equal(state, torch.get_rng_state())  # the caller's generator is left alone in both paths
    assert batched.index.tolist() == [i for i, b in zip(order, single) if len(b)] == [4, 0, 7, 3]
    rows = [b for b in single if len(b)]
    assert torch.equal(batched.images, torch.cat([b.images for b in rows]))
    assert torch.equal(batched.targets, torch.cat([b.targets for b in rows]))
    assert batched.skipped == [s for b in single for s in b.skipped]
    skipped = {s.name: s.reason for s in batched.skipped}
    assert skipped[str(folder / "missing.jpg")] == "missing"
    assert "not an image" in skipped[str(folder / "corrupt.jpg")]
    assert batched.names == ["4.jpg", "0.jpg", "7.jpg", "3.jpg"]
    ds.set_plan([order[:3], order[3:]], num_workers=0)  # reading ahead changes nothing in the rows
    planned = [ds.batch(order[:3]), ds.batch(order[3:])]
    assert torch.equal(torch.cat([b.images for b in planned]), batched.images)
    ds.set_epoch(seed=3, epoch=3)
    assert not torch.equal(ds.batch([4]).images[0], batched.images[0])  # another epoch, another crop


def test_loader_workers_use_the_batched_path(tmp_path):
    from mlc.data.loader import make_loader
    folder, names = _images(tmp_path, n=12)
    ds = StreamTable([str(folder / n) for n in names[:12]], None, train_transform(16), 50_000_000)
    seen = [b for b in make_loader(ds, 4, shuffle=True, seed=0, epoch=1, num_workers=2)]
    assert sorted(i for b in seen for i in b.index.tolist()) == list(range(12))
    ds.set_epoch(0, 1)
    for b in seen:
        for x, i in zip(b.images, b.index.tolist()):
            assert torch.equal(x, ds.batch([i]).images[0])
