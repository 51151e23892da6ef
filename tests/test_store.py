"""The decode-once image store: its files and their sharing and removal, its key, where it goes, the device-side
crops against the CPU transforms, and the tables read through it."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T

from mlc.data import store as st, store_choice
from mlc.data.augment import fit_to_slot, geometry, random_boxes, slot_side
from mlc.data.loader import make_loader
from mlc.data.sources import StoredTable, StreamTable
from mlc.data.transforms import (crop_batch, eval_transform, random_resized_crop_params, to_model_input,
                                 train_transform)
from mlc.io import identity
from mlc.io.images import decode_image

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "comp5329" / "images"


@pytest.fixture
def roots(tmp_path, monkeypatch):
    mem, disk = tmp_path / "mem", tmp_path / "disk"
    monkeypatch.setenv("MLC_STORE_MEMORY_DIR", str(mem))
    monkeypatch.setenv("MLC_STORE_DIR", str(disk))
    return mem, disk


def _real(n):
    if not REAL.is_dir():
        pytest.skip("../shared/data is not beside this clone")
    return sorted(REAL.glob("*.jpg"))[:n]


def test_crop_params_with_a_generator_are_torchvisions():
    for s in range(400):
        h, w = [(240, 320), (25, 36), (320, 90), (8, 300)][s % 4]
        torch.manual_seed(s)
        a = T.RandomResizedCrop.get_params(torch.empty(1, h, w), (0.35, 1.0), (3 / 4, 4 / 3))
        g = torch.Generator()
        g.manual_seed(s)
        assert tuple(a) == random_resized_crop_params(h, w, (0.35, 1.0), (3 / 4, 4 / 3), g)


def test_slot_side_holds_the_eval_resize_and_whole_comp5329_images():
    assert slot_side(224) == 320 and slot_side(64) == 96
    assert all(slot_side(s) >= s / 0.875 and slot_side(s) % 16 == 0 for s in range(32, 600, 7))


@pytest.mark.parametrize("kind", ["eval", "train"])
def test_device_crops_match_the_cpu_transforms_on_real_images(kind):
    """Each row's box, drawn from the same seed, cut from the stored slot on the device, equals the CPU path's
    PIL crop and resize to within rounding (mean under one grey level of 255)."""
    tf = eval_transform(224) if kind == "eval" else train_transform(224)
    side = slot_side(224)
    means, refs, outs = [], [], []
    for k, f in enumerate(_real(60)):
        data = f.read_bytes()
        seed = 1000 + k
        img = decode_image(data, f.name, draft=tf.draft)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ref = to_model_input(tf(img)[None], torch.device("cpu"), channels_last=False)
        arr = fit_to_slot(decode_image(data, f.name, draft=side), side)
        slot = np.zeros((side, side, 3), np.uint8)
        h, w = arr.shape[:2]
        slot[:h, :w], slot[:h, w:] = arr, arr[:, -1:]
        slot[h:] = slot[h - 1:h]
        meta = (h, w, img.size[1], img.size[0])
        if kind == "eval":
            geo = geometry(tf, [meta], None)
        else:  # the CPU path's own draws for this row, as a box on the stored pixels
            g = torch.Generator()
            g.manual_seed(seed)
            top, left, ch, cw, flip = tf.params(img.size[1], img.size[0], g)
            sx, sy = w / img.size[0], h / img.size[1]
            geo = np.array([[left * sx, top * sy, (left + cw) * sx, (top + ch) * sy, float(flip), 224.0]], np.float32)
        out = crop_batch(torch.from_numpy(slot)[None], torch.from_numpy(geo), torch.device("cpu"), channels_last=False)
        levels = ((out - ref) * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255).abs()
        means.append(levels.mean().item())
        refs.append(ref)
        outs.append(out)
    assert np.mean(means) < 0.6 and max(means) < 2.0, (np.mean(means), max(means))
    assert out.shape == (1, 3, 224, 224)


def test_batch_boxes_follow_torchvisions_distribution_and_depend_on_the_row_seed_alone():
    """The store path draws each row's crop and flip from its seed with a vectorised sampler, not torch's
    generator: same distribution as RandomResizedCrop + RandomHorizontalFlip, inside the image, and the same
    box for a row whichever batch (rank, thread) it is drawn in."""
    n, scale, ratio = 20_000, (0.35, 1.0), (3 / 4, 4 / 3)
    for h, w in ((240, 320), (320, 90), (25, 36)):
        H, W = np.full(n, h), np.full(n, w)
        left, top, cw, ch, flip = random_boxes(H, W, np.arange(n, dtype=np.uint64) * 7919, scale, ratio)
        assert (left >= 0).all() and (top >= 0).all() and (left + cw <= w).all() and (top + ch <= h).all()
        assert (cw >= 1).all() and (ch >= 1).all() and abs(flip.mean() - 0.5) < 0.02
        ref = []
        for s in range(4000):
            torch.manual_seed(s)
            i, j, rh, rw = T.RandomResizedCrop.get_params(torch.empty(1, h, w), scale, ratio)
            ref.append((rh * rw / (h * w), rw / rh, j / max(1, w - rw) if w > rw else 0.5))
        ref = np.array(ref)
        ours = np.stack([ch * cw / (h * w), cw / ch, np.where(w > cw, left / np.maximum(1, w - cw), 0.5)], 1)
        for q in (0.1, 0.25, 0.5, 0.75, 0.9):  # area share, aspect and horizontal position, quantile by quantile
            assert np.allclose(np.quantile(ours, q, axis=0), np.quantile(ref, q, axis=0), atol=0.03, rtol=0.03), q
    seeds = np.array([5, 6, 7, 8], dtype=np.uint64)
    a = random_boxes(np.full(4, 240), np.full(4, 320), seeds, scale, ratio)
    b = random_boxes(np.full(2, 240), np.full(2, 320), seeds[2:], scale, ratio)
    assert all(np.array_equal(x[2:], y) for x, y in zip(a, b))  # row 7's box does not depend on its neighbours


def test_store_rows_write_read_and_edge_fill(roots):
    mem, _ = roots
    s = st.open_store(str(mem), "k1", 3, 16)
    try:
        assert s.count() == 0
        px = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
        s.put(1, px, (50, 70))
        s.put_bad(2, "corrupt image (broken data stream)")
        assert s.count() == 2 and list(s.state) == [st.EMPTY, st.STORED, st.BAD]
        assert (s.pixels[1, :5, :7] == px).all() and (s.pixels[1, :5, 7:] == px[:, -1:]).all()
        assert (s.pixels[1, 5:] == s.pixels[1, 4]).all()
        assert list(s.meta[1]) == [5, 7, 50, 70] and s.reason(2) == "corrupt image (broken data stream)"
    finally:
        s.close()
    assert not (mem / "k1").exists()  # the last user removed it


def _open_and_fill(urls, i, q):
    # Each process derives the key itself, as each Ray Train worker does: the same table, the same store.
    s = store_choice.open_for_run(urls, 32, "memory", None, lambda *_: None)
    s.put(i, np.full((8, 8, 3), i, np.uint8), (8, 8))
    q.put(s.folder)
    time.sleep(1.0)  # everybody opens before anybody closes
    s.close()


def test_processes_racing_share_one_store_and_the_last_removes_it(roots, tmp_path):
    mem, _ = roots
    urls = []
    for i in range(8):
        (tmp_path / f"{i}.jpg").write_bytes(b"x" * (i + 1))
        urls.append(str(tmp_path / f"{i}.jpg"))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_open_and_fill, args=(urls, i, q)) for i in range(4)]
    holder = store_choice.open_for_run(urls, 32, "memory", None, lambda *_: None)  # sees every process's rows
    for p in ps:
        p.start()
    folders = {q.get(timeout=60) for _ in ps}
    for p in ps:
        p.join(60)
    assert folders == {holder.folder} and os.listdir(mem) == [os.path.basename(holder.folder)]
    assert holder.count() == 4 and all((holder.pixels[i, :8, :8] == i).all() for i in range(4))
    holder.close()
    assert os.listdir(mem) == []  # the last user removed it
    assert [n for n in os.listdir(mem) if n.startswith(".new-")] == []


def test_keep_holds_stores_between_users_and_sweeps_after(roots):
    mem, disk = roots
    with st.Keep():
        st.open_store(str(mem), "kept", 2, 8).close()
        assert (mem / "kept").exists()  # a later trial on this node reuses it
    assert not (mem / "kept").exists()


def test_a_killed_user_leaves_a_store_the_next_run_removes(roots):
    mem, _ = roots
    code = ("import sys, time; from mlc.data import store; store.open_store(sys.argv[1], 'orphan', 2, 8); "
            "print('open', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(mem)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "open"
    assert st.sweep(str(mem)) == []  # in use: never removed
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (mem / "orphan").exists()
    assert st.sweep(str(mem)) == ["orphan"] and not (mem / "orphan").exists()


def test_the_key_changes_with_any_image_the_order_and_the_size(tmp_path):
    for name in "abc":
        (tmp_path / f"{name}.jpg").write_bytes(b"x" * 10)
    urls = [str(tmp_path / f"{n}.jpg") for n in "abc"]
    k = identity.digest(urls, 1, 96)
    assert identity.digest(urls, 1, 96) == k
    assert identity.digest(urls[::-1], 1, 96) != k
    assert identity.digest(urls, 1, 320) != k
    os.utime(urls[1], ns=(1, 1))  # rewritten (mtime changes)
    k2 = identity.digest(urls, 1, 96)
    assert k2 != k
    (tmp_path / "c.jpg").write_bytes(b"y" * 10)  # same size, new content
    assert identity.digest(urls, 1, 96) != k2
    os.remove(urls[0])
    assert identity.stamps(urls)[0] is None


def test_where_the_store_goes(roots, monkeypatch):
    mem, disk = roots
    n, side = 100, 96
    need, small = st.nbytes(n, side), st.nbytes(n, side, st.compact_bytes(side))
    keys = {"raw": "k", "compact": "kc"}
    root, slot, msg = store_choice.choose("auto", None, n, side, keys)
    assert root == str(mem) and slot is None and "raw, in memory" in msg
    # over the memory budget for raw pixels, not for JPEG slots, and the disk holds raw pixels: the rates decide
    raw_slot = st.nbytes(1, side)
    monkeypatch.setattr(store_choice, "decode_rate", lambda s: 1000.0)
    monkeypatch.setattr(store_choice, "disk_read_rate", lambda root, chunk: 1500.0 * raw_slot)
    root, slot, msg = store_choice.choose("auto", (need + small) / 2 / 2**30, n, side, keys, decoders=2)
    assert root == str(mem) and slot == st.compact_bytes(side) and "compact, in memory" in msg
    assert "images/s a core" in msg and "do not fit" in msg
    assert "compact in memory chosen by rate" in msg and "1500 images/s" in msg and "2000 images/s by 2" in msg, msg
    # the node's first decision stands for its other processes, whatever their own measurement would say
    root, slot, msg = store_choice.choose("auto", (need + small) / 2 / 2**30, n, side, keys, decoders=1)
    assert root == str(mem) and slot == st.compact_bytes(side) and "decided by an earlier process" in msg, msg
    for f in disk.glob(".choice-*"):
        f.unlink()
    root, slot, msg = store_choice.choose("auto", (need + small) / 2 / 2**30, n, side, keys, decoders=1)
    assert root == str(disk) and slot is None and "raw, in local disk" in msg, msg  # 1,500 read beat 1,000 decoded
    assert "raw on local disk chosen by rate" in msg and "1000 images/s by 1" in msg, msg
    assert "earlier process" not in msg and [f.name for f in disk.glob(".*choice-*")] == [".choice-k.json"]
    root, slot, msg = store_choice.choose("auto", small / 2 / 2**30, n, side, keys)  # neither fits memory: disk
    assert root == str(disk) and slot is None and "local disk" in msg and "memory" in msg
    monkeypatch.setattr(store_choice, "free_bytes", lambda r: small)  # half the disk holds neither: stream
    root, slot, msg = store_choice.choose("auto", 0.0, n, side, keys)
    assert root is None and "streaming" in msg and "--store-budget" in msg
    with pytest.raises(ValueError, match="--store memory"):
        store_choice.choose("memory", 0.0, n, side, keys)
    assert store_choice.choose("off", None, n, side, keys)[0] is None
    s = st.open_store(str(disk), "kc", n, side, st.compact_bytes(side))  # made by another process: used there
    try:
        root, slot, msg = store_choice.choose("auto", 0.0, n, side, keys)
        assert root == str(disk) and slot == st.compact_bytes(side) and "already using it" in msg
    finally:
        s.close()


def test_a_compact_slot_keeps_full_colour_where_it_fits_and_falls_back_to_420_at_the_same_quality():
    """4:4:4 first: a shrunk image's colour edges (what the demo's labels are) lose less than under 4:2:0."""
    import io
    from PIL import Image, JpegImagePlugin
    from mlc.data.slot_codec import encode_slot
    rng = np.random.default_rng(0)
    px = np.clip(np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((12, 12, 1))) + rng.normal(0, 12, (48, 48, 3)),
                 0, 255).astype(np.uint8)  # 48 px of colour blocks and noise, as a shrunk photo's slot

    def sampling(data):
        with Image.open(io.BytesIO(data)) as img:
            return JpegImagePlugin.get_sampling(img), np.abs(np.asarray(img.convert("RGB"), float) - px).mean()
    full, half = encode_slot(px), encode_slot(px, limit=len(encode_slot(px)) - 1)
    (s_full, e_full), (s_half, e_half) = sampling(full), sampling(half)
    assert (s_full, s_half) == (0, 2) and e_full < e_half, (e_full, e_half)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG", quality=90, subsampling=2)
    assert half == buf.getvalue()  # 4:2:0 at quality 90 still, not a lower quality


def test_the_disk_read_rate_is_measured_on_a_file_it_removes(tmp_path):
    rate = store_choice.disk_read_rate(str(tmp_path / "store"), 300 * 1024, total=4 * 2**20)
    assert 0 < rate < float("inf")
    assert list((tmp_path / "store").iterdir()) == []
    assert store_choice.disk_read_rate(str(tmp_path / "store"), 300 * 1024) == rate  # once a process


def _table(paths, transform, store=None):
    y = np.eye(3, dtype=np.float32)[np.arange(len(paths)) % 3]
    if store is None:
        return StreamTable([str(p) for p in paths], y, transform, 50_000_000)
    return StoredTable([str(p) for p in paths], y, transform, 50_000_000, store, np.arange(len(paths)))


@pytest.mark.parametrize("form", ["raw", "compact"])
def test_a_table_reads_the_same_rows_while_filling_and_from_the_store(roots, tmp_path, form):
    paths = _real(24)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    paths = paths + [bad]
    budget = None if form == "raw" else 0.0002  # 200 KiB: the 25 JPEG slots (69 KB), not their pixels (691 KB)
    # memory: with auto the disk could win by rate (tested in test_where_the_store_goes)
    store = store_choice.open_for_run([str(p) for p in paths], 64, "memory", budget, lambda *_: None)
    try:
        assert (store.compact is not None) == (form == "compact")
        ds = _table(paths, train_transform(64), store)
        ds.set_epoch(0, 1)
        first = ds.batch(list(range(len(paths))))
        assert store.count() == len(paths) and ds.to_decode() == 0
        again = ds.batch(list(range(len(paths))))
        assert torch.equal(first.images, again.images) and torch.equal(first.boxes, again.boxes)
        assert first.index.tolist() == again.index.tolist() == list(range(24))
        assert [s.name for s in first.skipped] == [s.name for s in again.skipped] == [str(bad)]
        assert first.skipped[0].reason == again.skipped[0].reason and "html" in again.skipped[0].reason.lower()
        ds.set_epoch(0, 2)  # another epoch draws other crops from the same pixels
        third = ds.batch([0])
        assert torch.equal(third.images[0], first.images[0]) and not torch.equal(third.boxes[0], first.boxes[0])
        # A (nearly) complete store is read by a thread, not loader processes, and gives the DataLoader's
        # batches; a row the first epoch left out (here: forgotten) is decoded by that thread.
        store.state[3] = st.EMPTY
        loader = make_loader(ds, 8, shuffle=True, seed=0, epoch=3, num_workers=2)
        assert loader.threaded
        by_thread = list(loader)
        assert store.state[3] == st.STORED
        ds.to_decode = lambda: len(paths)  # as if nothing were stored: the DataLoader's worker processes
        workers = make_loader(ds, 8, shuffle=True, seed=0, epoch=3, num_workers=2)
        assert not workers.threaded
        by_workers = list(workers)
        assert len(by_thread) == len(by_workers) == 4  # 25 rows in batches of 8
        for a, b in zip(by_thread, by_workers):
            assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes) and torch.equal(a.index, b.index)
            assert [s.name for s in a.skipped] == [s.name for s in b.skipped]
            assert a.global_rows == b.global_rows == len(a) + len(a.skipped)
    finally:
        store.close()


def test_loader_processes_fill_the_shared_store(roots):
    paths = _real(12)
    store = store_choice.open_for_run([str(p) for p in paths], 64, "auto", None, lambda *_: None)
    try:
        ds = _table(paths, eval_transform(64), store)
        batches = list(make_loader(ds, 4, shuffle=False, num_workers=2))
        assert sum(len(b) for b in batches) == 12 and store.count() == 12  # written by the worker processes
        x = crop_batch(batches[0].images, batches[0].boxes, torch.device("cpu"))
        assert x.shape == (4, 3, 64, 64) and torch.isfinite(x).all()
    finally:
        store.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_crops_on_cuda_equal_the_cpu_crops():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 96, 96, 3), dtype=torch.uint8, generator=g)
    geo = torch.tensor([[3, 5, 80, 90, float(i % 2), 64] for i in range(8)], dtype=torch.float32)
    cpu = crop_batch(x, geo, torch.device("cpu"))
    gpu = crop_batch(x.pin_memory(), geo.pin_memory(), torch.device("cuda"))
    torch.cuda.synchronize()
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_from_the_store_on_cuda_is_finite_and_matches_the_cpu_inputs(roots):
    """The GPU path end to end: pinned slots copied without blocking, cut on the device while the previous
    step still runs; every batch's device input equals the CPU's crop of the same rows."""
    paths = _real(48)
    store = store_choice.open_for_run([str(p) for p in paths], 64, "auto", None, lambda *_: None)
    try:
        ds = _table(paths, train_transform(64), store)
        list(make_loader(ds, 16, shuffle=True, seed=0, epoch=1, num_workers=2, pin_memory=True))  # fill
        cuda, cpu = torch.device("cuda"), torch.device("cpu")
        busy = torch.randn(4096, 4096, device=cuda)
        for batch in make_loader(ds, 16, shuffle=True, seed=0, epoch=2, pin_memory=True):
            busy = busy @ busy / 4096  # queued work on the stream while the batch arrives
            (x,) = batch.inputs(cuda)
            (ref,) = batch.inputs(cpu)
            assert torch.isfinite(x).all() and torch.allclose(x.cpu(), ref, atol=1e-3)
    finally:
        store.close()


def test_each_rows_input_is_the_same_at_any_world_size_and_rank(roots, tmp_path):
    """DDP's premise through the store: a row gets the same crop, flip and pixels whether one process reads it or
    one of two ranks does, in the epoch that fills the store (loader) and after it (thread), with the other
    rank's process having decoded it."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer import cfg_for, make_dataset
    from mlc.data.run_data import open_sources, prepare_data
    cfg = cfg_for(make_dataset(tmp_path / "ds"), tmp_path / "out", batch_size=8)
    data = prepare_data(cfg, lambda *_: None)

    def rows(world):
        tr, _, store = open_sources(cfg, data, log=lambda *_: None)
        out, kinds = {}, []
        try:
            for epoch in (1, 2):
                for rank in range(world):
                    loader = make_loader(tr, 8, shuffle=True, seed=0, epoch=epoch, drop_last=True, rank=rank,
                                         world=world)
                    kinds.append("thread" if loader.threaded else "processes")
                    for b in loader:
                        (x,), y = b.inputs(torch.device("cpu")), b.targets
                        out.update({(epoch, i): (x[k], y[k]) for k, i in enumerate(b.index.tolist())})
        finally:
            store.close()
        return out, kinds
    one, kinds1 = rows(1)
    two, kinds2 = rows(2)
    assert one.keys() == two.keys() and len(one) == 48
    assert all(torch.equal(one[k][0], two[k][0]) and torch.equal(one[k][1], two[k][1]) for k in one)
    assert kinds1 == ["processes", "thread"] and kinds2 == ["processes"] * 2 + ["thread"] * 2
