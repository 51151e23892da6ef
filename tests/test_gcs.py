"""gs:// end to end against a real GCS JSON API server (gcp-storage-emulator behind tests/gcs_server.py's proxy):
round trips, transient and permanent faults, writes that fail midway, the byte cache, and training runs whose
data and outputs live in the bucket."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from mlc.io import storage
from mlc.train import driver as trainer, loop
from mlc.model.checkpoint import read_model, load_state, save_state
from mlc.config import TrainConfig
from mlc.data.sources import StreamTable
from mlc.data.loader import make_loader
from mlc.data.demo import make_demo_dataset
from mlc.io.storage import AccessDenied, ObjectNotFound, StorageError
from mlc.data.transforms import train_transform

REPO = Path(__file__).resolve().parents[1]
BIG = 60 * 2**20  # above gcsfs's 50 MB simple-upload limit: a resumable upload in 50 MB chunks


def test_round_trip(gcs):
    base = gcs.url("run")
    storage.write_text(storage.join(base, "a", "metrics.json"), '{"ok": 1}')
    storage.write_bytes(storage.join(base, "a", "b", "model.pt"), b"\x00" * 100)
    assert storage.read_bytes(storage.join(base, "a", "metrics.json")) == b'{"ok": 1}'
    assert storage.listdir(storage.join(base, "a")) == ["b", "metrics.json"]
    assert storage.exists(storage.join(base, "a", "b", "model.pt")) and storage.isdir(storage.join(base, "a"))
    assert not storage.exists(storage.join(base, "nothing"))
    with storage.writer(storage.join(base, "t.pt")) as f:
        torch.save({"w": torch.arange(5)}, f)
    assert torch.equal(torch.load(io.BytesIO(storage.read_bytes(storage.join(base, "t.pt"))))["w"], torch.arange(5))
    many = storage.read_many([storage.join(base, "a", "metrics.json"), storage.join(base, "gone")])
    assert many[storage.join(base, "a", "metrics.json")] == b'{"ok": 1}'
    assert isinstance(many[storage.join(base, "gone")], ObjectNotFound)
    storage.remove(base, recursive=True)
    assert not storage.exists(storage.join(base, "a", "metrics.json"))
    # The proxy kept the single-threaded emulator to a few connections whatever the client did.
    assert gcs.proxy.max_upstream_seen <= 4


def test_transient_503_and_429_are_retried_on_reads_and_writes(gcs):
    from concurrent.futures import ThreadPoolExecutor
    urls = [gcs.url(f"t/{k}.bin") for k in range(8)]
    # Writes: one upload meets a 503, another a 429 (gcsfs waits 1-2 s before its first retry; the two wait
    # side by side here).
    write_faults = [gcs.proxy.add_fault(503, "POST", r"uploadType=multipart", times=1),
                    gcs.proxy.add_fault(429, "POST", r"uploadType=multipart", times=1)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: storage.write_bytes(urls[k], bytes([k]) * 1000), range(8)))
    # Reads: one object answers 429 once, another 503 once; every object arrives intact.
    read_faults = [gcs.proxy.add_fault(429, "GET", r"o/t/2\.bin", times=1),
                   gcs.proxy.add_fault(503, "GET", r"o/t/5\.bin", times=1)]
    got = storage.read_many(urls)
    assert all(got[urls[k]] == bytes([k]) * 1000 for k in range(8))
    solo = gcs.proxy.add_fault(503, "GET", r"o/t/7\.bin", times=1)
    assert storage.read_bytes(urls[7]) == bytes([7]) * 1000
    assert [f.hits for f in write_faults + read_faults + [solo]] == [1, 1, 1, 1, 1]
    assert gcs.proxy.count("POST", "upload") == 8 + 2 and gcs.proxy.count("GET") == 8 + 2 + 1 + 1


def test_permanent_403_and_404_fail_naming_the_object(gcs):
    url = gcs.url("p/secret.csv")
    storage.write_text(url, "ImageID,Labels\n")
    gcs.proxy.add_fault(403, "GET", r"o/p/secret\.csv", times=None)
    with pytest.raises(AccessDenied, match=r"gs://.*/p/secret\.csv: permission denied while trying to read it.*"
                                           r"credentials"):
        storage.read_bytes(url)
    gcs.proxy.clear_faults()
    with pytest.raises(ObjectNotFound, match=r"gs://.*/p/absent\.csv: no such file or object"):
        storage.read_bytes(gcs.url("p/absent.csv"))
    gcs.proxy.add_fault(404, "GET", r"o/p/secret\.csv", times=None)
    with pytest.raises(FileNotFoundError, match=r"p/secret\.csv"):
        storage.read_bytes(url)
    gcs.proxy.add_fault(403, "POST", r"upload", times=None)
    before = gcs.proxy.count("POST", "upload")
    with pytest.raises(AccessDenied, match=r"p/out\.json: permission denied while trying to write it"):
        storage.write_text(gcs.url("p/out.json"), "{}")
    assert gcs.proxy.count("POST", "upload") == before + 1  # a 403 is not retried


def test_a_403_on_an_image_stops_the_loader_naming_it_a_404_skips_it(gcs, tmp_path, monkeypatch):
    monkeypatch.setenv("MLC_BYTE_CACHE", "off")  # else the second pass would not ask the server at all
    root = make_demo_dataset(str(tmp_path / "demo"), n_train=12, n_test=0, image_size=32)
    gcs.upload(Path(root) / "data", gcs.url("img"))
    names = sorted(storage.listdir(gcs.url("img")))
    urls = [gcs.url(f"img/{n}") for n in names] + [gcs.url("img/not-there.jpg")]
    ds = StreamTable(urls, None, train_transform(16), 50_000_000)
    batches = list(make_loader(ds, 4, shuffle=False, num_workers=2))
    assert [s.name for b in batches for s in b.skipped] == [gcs.url("img/not-there.jpg")]
    gcs.proxy.add_fault(403, "GET", rf"o/img/{names[5]}", times=None)
    it = iter(make_loader(ds, 4, shuffle=False, num_workers=2))
    try:
        list(it)
        pytest.fail("a 403 on an image did not stop the loader")
    except AccessDenied as e:
        message = str(e)
        # torch re-raises a worker's exception from a frame that holds it: the traceback makes a reference cycle
        # with the iterator, and when the garbage collector breaks it the worker queues may be closed first,
        # so the iterator's __del__ waits 5 s per worker before killing them. Drop the traceback: the iterator
        # then goes away here, with its workers, at once.
        e.__traceback__ = None
    del it
    assert re.search(rf"img/{names[5]}: permission denied", message), message


def _state(extra=None) -> dict:
    state = {"model": {"w": torch.zeros(BIG // 4)}, "epoch": 1}
    state.update(extra or {})
    return state


def test_an_exception_mid_write_leaves_no_object_at_the_final_key(gcs):
    # A state that cannot be written (a function is not plain data: checkpoint.py refuses it before or while
    # serialising, after the 60 MB tensor): nothing may appear at the final key.
    ckpt = gcs.url("run/checkpoint")
    with pytest.raises(Exception, match="lambda|pickle|not plain data"):
        save_state(ckpt, _state({"callback": lambda: 0}))
    assert not storage.exists(storage.join(ckpt, "state.pt"))
    # writer(): the block raises after writing part of the content.
    with pytest.raises(RuntimeError):
        with storage.writer(gcs.url("run/predictions.csv")) as f:
            f.write(b"ImageID,Labels\n1.jpg,1\n")
            raise RuntimeError("interrupted")
    assert not storage.exists(gcs.url("run/predictions.csv"))

    # An upload that dies after its first 50 MB chunk: nothing at the key; an older object stays intact.
    save_state(ckpt, _state({"epoch": 1}))
    gcs.proxy.add_fault(403, "POST", r"upload_id", times=None, after=1)
    with pytest.raises(AccessDenied, match=r"checkpoint/state\.pt"):
        save_state(ckpt, _state({"epoch": 2}))
    gcs.proxy.clear_faults()
    assert load_state(ckpt)["epoch"] == 1
    with pytest.raises(AccessDenied):
        gcs.proxy.add_fault(403, "POST", r"upload_id", times=None, after=1)
        storage.write_bytes(gcs.url("run/new.bin"), b"x" * BIG)
    gcs.proxy.clear_faults()
    assert not storage.exists(gcs.url("run/new.bin"))
    assert "new.bin" not in storage.listdir(gcs.url("run"))


def test_check_writable(gcs):
    storage.check_writable(gcs.url("out/run1"))
    assert storage.listdir(gcs.url("")) == []  # the probe object is gone
    with pytest.raises(StorageError, match=r"gs://no-such-bucket-mlc/run is not writable.*bucket must exist"):
        storage.check_writable("gs://no-such-bucket-mlc/run")
    gcs.proxy.add_fault(403, "POST", r"upload", times=None)
    with pytest.raises(StorageError, match=rf"output location gs://{gcs.bucket}/out is not writable.*permission"):
        storage.check_writable(gcs.url("out"))
    gcs.proxy.clear_faults()
    gcs.proxy.add_fault(403, "DELETE", None, times=None)  # may create but not overwrite or delete
    with pytest.raises(StorageError, match="not writable"):
        storage.check_writable(gcs.url("out"))


def test_second_epoch_reads_nothing_from_the_bucket(gcs, tmp_path):
    root = make_demo_dataset(str(tmp_path / "demo"), n_train=24, n_test=0, image_size=32)
    local = Path(root) / "data"
    gcs.upload(local, gcs.url("img"))
    names = sorted(p.name for p in local.iterdir())
    remote = StreamTable([gcs.url(f"img/{n}") for n in names], None, train_transform(16), 50_000_000)
    here = StreamTable([str(local / n) for n in names], None, train_transform(16), 50_000_000)
    gcs.proxy.log.clear()
    for epoch in (1, 2):
        got = {i: x for b in make_loader(remote, 5, shuffle=True, seed=1, epoch=epoch, num_workers=2)
               for i, x in zip(b.index.tolist(), b.images)}
        assert gcs.proxy.count("GET") == len(names)  # each image read once in epoch 1, and never again
        want = {i: x for b in make_loader(here, 5, shuffle=True, seed=1, epoch=epoch, num_workers=0)
                for i, x in zip(b.index.tolist(), b.images)}
        assert got.keys() == want.keys() and all(torch.equal(got[i], want[i]) for i in want)
    assert len(list((tmp_path / "byte-cache").rglob("*"))) >= len(names)


def _cfg(data: str, out: str, **kw) -> TrainConfig:
    base = dict(data=data, output=out, weights="none", image_size=32, epochs=1, batch_size=8, unfrozen_depth=0,
                dropout=0.0, loader_workers=2, val_fraction=0.25, lr=1e-3, amp="off")
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def gcs_dataset(gcs, tmp_path):
    root = make_demo_dataset(str(tmp_path / "demo"), n_train=32, n_test=8, image_size=32)
    gcs.upload(root, gcs.url("data"))
    return gcs.url("data")


def test_a_run_with_data_and_outputs_in_the_bucket_survives_transient_faults(gcs, gcs_dataset):
    out = gcs.url("runs/r1")
    faults = [gcs.proxy.add_fault(503, "GET", r"o/data/data/.*\.jpg", times=1, after=3),   # image reads (workers)
              gcs.proxy.add_fault(429, "GET", r"o/data/train\.csv", times=1),                # table read
              gcs.proxy.add_fault(429, "POST", r"uploadType=multipart", times=1, after=3),  # small writes
              gcs.proxy.add_fault(503, "POST", r"uploadType=resumable$", times=1),          # checkpoint start
              gcs.proxy.add_fault(503, "POST", r"upload_id", times=1, after=1)]             # checkpoint chunk
    logs = []
    summary = trainer.fit(_cfg(gcs_dataset, out), log=logs.append, progress=False)
    assert [f.hits for f in faults] == [1, 1, 1, 1, 1], faults

    metrics = json.loads(storage.read_bytes(storage.join(out, "metrics.json")))
    assert metrics["complete"] is True and [e["epoch"] for e in metrics["epochs"]] == [1]
    state = load_state(storage.join(out, "checkpoint"))
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    model, vocab, meta = read_model(out)  # checks model.pt against meta.json's sha256
    # The demo tables have captions: auto trained image+caption, its tokenizer saved in the bucket beside it.
    assert meta["config"]["inputs"] == "image+caption" and meta["tokenizer"]["vocab"]
    assert storage.exists(storage.join(out, "best", "tokenizer.json"))
    pred = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(out, "predictions.csv"))), dtype=str)
    test = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(gcs_dataset, "test.csv"))), dtype=str)
    assert pred.ImageID.tolist() == test.ImageID.tolist() and summary["test"]["rows"] == len(test)
    assert {"history.png", "threshold.png"} <= set(storage.listdir(storage.join(out, "plots")))
    assert gcs.proxy.max_upstream_seen <= 4
    from mlc.model.resnet import load_weights  # --weights gs://...: a run's best/ folder as the starting point
    assert load_weights(storage.join(out, "best")).keys() == model.keys()

    # A job in a subprocess inherits the settings: predict from the bucket's checkpoint into the bucket.
    again = gcs.url("runs/again")
    r = subprocess.run([sys.executable, "jobs/predict.py", "--checkpoint", out, "--output", again,
                        "--loader-workers", "0", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert storage.read_bytes(storage.join(again, "predictions.csv")) == \
        storage.read_bytes(storage.join(out, "predictions.csv"))


def test_an_unwritable_output_fails_before_any_training(gcs, gcs_dataset):
    logs = []
    gcs.proxy.add_fault(403, "POST", r"upload", times=None)
    with pytest.raises(StorageError, match=rf"output location gs://{gcs.bucket}/runs/r2 is not writable"):
        trainer.fit(_cfg(gcs_dataset, gcs.url("runs/r2")), log=logs.append, progress=False)
    assert not any("epoch" in line for line in logs)
    assert gcs.proxy.count("GET", r"\.jpg") == 0  # not one image was read
    with pytest.raises(StorageError, match="gs://no-such-bucket-mlc/r3 is not writable"):
        trainer.fit(_cfg(gcs_dataset, "gs://no-such-bucket-mlc/r3"), log=logs.append, progress=False)


def test_pyarrow_filesystem_for_ray_storage(gcs, tmp_path):
    """What Ray Train does with RunConfig(storage_filesystem=fs, storage_path=path): make folders, copy a local
    checkpoint folder up, list it, read it back."""
    import pyarrow.fs as pafs

    from mlc.distributed.ray_folder import pyarrow_filesystem
    fs, path = pyarrow_filesystem(gcs.url("ray/exp"))
    assert isinstance(fs, pafs.PyFileSystem) and path == f"{gcs.bucket}/ray/exp"
    fs.create_dir(path + "/trial")
    with fs.open_output_stream(path + "/trial/result.json") as f:
        f.write(b'{"loss": 1}')
    ckpt = tmp_path / "checkpoint_000000"
    ckpt.mkdir()
    (ckpt / "model.pt").write_bytes(b"w" * 1000)
    (ckpt / "meta.json").write_text("{}")
    pafs.copy_files(str(ckpt), path + "/trial/checkpoint_000000", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    infos = fs.get_file_info(pafs.FileSelector(path + "/trial", recursive=True))
    assert sorted(i.path.split("/trial/")[1] for i in infos if i.type == pafs.FileType.File) == \
        ["checkpoint_000000/meta.json", "checkpoint_000000/model.pt", "result.json"]
    assert storage.read_bytes(gcs.url("ray/exp/trial/checkpoint_000000/model.pt")) == b"w" * 1000
    import pickle  # Ray ships the filesystem to its workers: it must survive pickling (as options, no secrets)
    again = pickle.loads(pickle.dumps(fs))
    assert again.get_file_info(path + "/trial/result.json").size == len(b'{"loss": 1}')
    fs.delete_dir(path)
    assert not storage.exists(gcs.url("ray/exp/trial/result.json"))


def test_each_process_reads_its_next_batch_ahead(gcs, tmp_path, monkeypatch):
    """With a plan (what the loader will ask for), the reads of a process's next batch start before the current
    batch is decoded; the rows are the same as without, and nothing is read twice."""
    import time

    monkeypatch.setenv("MLC_BYTE_CACHE", "off")
    root = make_demo_dataset(str(tmp_path / "demo"), n_train=12, n_test=0, image_size=32)
    local = Path(root) / "data"
    gcs.upload(local, gcs.url("img"))
    names = sorted(p.name for p in local.iterdir())
    remote = StreamTable([gcs.url(f"img/{n}") for n in names], None, train_transform(16), 50_000_000)
    here = StreamTable([str(local / n) for n in names], None, train_transform(16), 50_000_000)
    for ds in (remote, here):
        ds.set_epoch(0, 1)
    gcs.proxy.log.clear()

    def gets_settle_at(n):
        deadline = time.monotonic() + 10
        while gcs.proxy.count("GET") < n and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        return gcs.proxy.count("GET")

    remote.set_plan([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], num_workers=0)
    first = remote.batch([0, 1, 2, 3])
    assert gets_settle_at(8) == 8  # this batch, and the next one read ahead
    second = remote.batch([4, 5, 6, 7])  # served by the read-ahead; the third batch's reads start
    assert gets_settle_at(12) == 12
    assert torch.equal(torch.cat([first.images, second.images]), here.batch(list(range(8))).images)
    assert remote.batch([1, 0]).index.tolist() == [1, 0]  # off the plan: read now, still right

    # Through a DataLoader with two workers: batches go round robin, each worker reads its next one ahead.
    loader = make_loader(remote, 3, shuffle=True, seed=0, epoch=2, num_workers=2)
    gcs.proxy.log.clear()
    got = {i: x for b in loader for i, x in zip(b.index.tolist(), b.images)}
    assert gcs.proxy.count("GET") == len(names)  # every image once: no read wasted on a wrong guess
    here.set_epoch(0, 2)
    assert all(torch.equal(got[i], here.batch([i]).images[0]) for i in range(len(names)))
