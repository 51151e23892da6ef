"""--gpu-decode: the device decoder (run here with device="cpu", torchvision's libjpeg) gives the CPU path's
crops, skips what it cannot decode by name, and leaves non-JPEG files to the CPU path."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from mlc.data.datasets import ImageTable

from mlc.data.loader import Batch, collate, make_loader
from mlc.data.gpu_decode import RawJpeg
from mlc.data.loader import batch_to_device
from mlc.data.transforms import eval_transform, train_transform

CPU = torch.device("cpu")


def _write(folder, name, img, fmt="JPEG"):
    img.save(folder / name, fmt, quality=95)
    return str(folder / name)


def _photo(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)


def test_device_decode_matches_the_cpu_path_for_training_and_evaluation(tmp_path):
    urls = [_write(tmp_path, f"{i}.jpg", _photo(320 - 40 * i, 240 + 20 * i, i)) for i in range(4)]
    y = np.eye(4, dtype=np.float32)
    for tf in (train_transform(64), eval_transform(64)):
        cpu = ImageTable(urls, y, tf, 50_000_000)
        dev = ImageTable(urls, y, tf, 50_000_000, gpu_decode=True)
        for ds in (cpu, dev):
            ds.set_epoch(3, 2)
        a = collate(cpu.__getitems__([0, 1, 2, 3]))
        b = collate(dev.__getitems__([0, 1, 2, 3]))
        assert a.raw == [] and len(b.raw) == 4 and b.x is None  # the bytes travel, not pixels
        (xa,), ya, ia, _ = batch_to_device(a, CPU)
        (xb,), yb, ib, lost = batch_to_device(b, CPU)
        assert lost == [] and ia.tolist() == ib.tolist() == [0, 1, 2, 3]
        assert torch.equal(ya, yb)
        # The same crop box and flip, drawn from the same per-row seed: only the decoders' and resizers'
        # rounding differ (a different box would differ by tens of grey levels).
        diff = (xa - xb).abs().mean().item() * 0.226 * 255  # back to grey levels, roughly
        assert diff < 4.0, diff


def test_device_decode_skips_a_truncated_jpeg_by_name_and_leaves_other_formats_to_the_cpu(tmp_path):
    good = _write(tmp_path, "good.jpg", _photo(200, 160, 1))
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    cut = str(tmp_path / "cut.jpg")
    cmyk = _write(tmp_path, "cmyk.jpg", _photo(200, 160, 2).convert("CMYK"))
    png = _write(tmp_path, "png.jpg", _photo(200, 160, 3), "PNG")
    ds = ImageTable([good, cut, cmyk, png], np.eye(4, dtype=np.float32), eval_transform(32), 50_000_000,
                    gpu_decode=True)
    rows = ds.__getitems__([0, 1, 2, 3])
    assert [type(r).__name__ for r in rows[:2]] == ["RawJpeg", "RawJpeg"]  # headers are fine
    assert isinstance(rows[2], tuple) and isinstance(rows[3], tuple)      # decoded here, on the CPU
    b = collate(rows)
    (x,), y, index, lost = batch_to_device(b, CPU)
    assert [s.name for s in lost] == [cut] and "truncated" in lost[0].reason
    assert sorted(index.tolist()) == [0, 2, 3] and x.shape == (3, 3, 32, 32)
    assert torch.equal(y[index.tolist().index(0)], torch.tensor([1.0, 0, 0, 0]))


def test_a_loader_with_gpu_decode_yields_every_row_once(tmp_path):
    urls = [_write(tmp_path, f"{i}.jpg", _photo(96, 80, i)) for i in range(10)]
    ds = ImageTable(urls, np.zeros((10, 2), dtype=np.float32), train_transform(32), 50_000_000, gpu_decode=True)
    seen = []
    for batch in make_loader(ds, 4, shuffle=True, seed=0, epoch=1, num_workers=2, drop_last=False):
        assert isinstance(batch, Batch) and all(isinstance(r, RawJpeg) for r in batch.raw)
        (x,), _, index, lost = batch_to_device(batch, CPU)
        assert x.shape[0] == len(index) and not lost
        seen += index.tolist()
    assert sorted(seen) == list(range(10))


def test_the_prepared_gpu_check_runs_through_on_a_cpu_with_tiny_settings(tmp_path, monkeypatch):
    """jobs/bench.py --gpu cannot run here; its code path can, so it does not rot while no GPU is at hand."""
    from mlc.bench.gpu import run
    monkeypatch.setenv("MLC_STORE_MEMORY_DIR", str(tmp_path / "store"))
    paths = [_write(tmp_path, f"{i}.jpg", _photo(96, 80, i)) for i in range(6)]
    lines = []
    # One depth: depth 4's rows run the same code with another model (the GPU run does both).
    rows = run(CPU, paths, batch=2, size=32, steps=1, budget_s=80, workers=0, amp_setting="off", depths=(4,),
               log=lines.append)
    by = {r["item"]: r for r in rows}
    for d in (4,):
        for item in (f"depth {d}: model alone", f"depth {d}: end to end, CPU decode", f"depth {d}: end to end, store",
                     f"depth {d}: end to end, --gpu-decode"):
            assert by[item]["img_s"] > 0, by[item]
        assert by[f"depth {d}: end to end, store"]["first_epoch_s"] > 0
    assert by["predict: end to end, CPU decode"]["img_s"] > 0
    assert all("skipped" in r for k, r in by.items() if "compiled" in k)  # no time left for a compile
    assert any(line.startswith("| depth 4: end to end, store |") and "of the model alone" in line
               and "first epoch" in line for line in lines)
    assert os.listdir(tmp_path / "store") == []  # the store is gone with the check


def test_the_gpu_check_fails_after_its_table_when_a_row_fails(tmp_path, monkeypatch):
    """A non-finite loss in any row is reported in the table, and then the check fails (exits non-zero)."""
    import mlc.bench.gpu as gpu
    from mlc.train.engine import NonFiniteLossError

    def bad(*a, **k):
        raise NonFiniteLossError("epoch 2 step 2: the loss or its gradient is not finite")
    monkeypatch.setattr(gpu, "end_to_end", bad)
    monkeypatch.setattr(gpu, "model_only", lambda *a, **k: {"img_s": 100.0, "warmup_s": 0.0})
    lines = []
    with pytest.raises(RuntimeError, match="NonFiniteLossError"):
        gpu.run(CPU, [], batch=2, size=32, steps=1, budget_s=120, workers=0, amp_setting="off", depths=(1,),
                log=lines.append)
    assert any(line.startswith("| depth 1: end to end, --gpu-decode | - |") for line in lines)


def test_device_decode_does_not_race_with_the_callers_stream(tmp_path):
    """The upstream race (pytorch/vision#9606), reproduced: tensors freed while kernels still read them on the
    current stream, then a decode. The decoded images must equal the CPU decoder's and the kernels' results
    must be what they are without a decode in between. Needs a GPU; skipped without one."""
    import pytest
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: the race is between CUDA streams")
    from mlc.data.gpu_decode import decode_rows
    dev = torch.device("cuda", 0)
    urls = [_write(tmp_path, f"{i}.jpg", _photo(320, 240, i)) for i in range(16)]
    raw = [RawJpeg(torch.frombuffer(bytearray(open(u, "rb").read()), dtype=torch.uint8), None,
                   torch.zeros(1), i, u, 64, 73) for i, u in enumerate(urls)]
    want, _ = decode_rows(raw, CPU)
    torch.manual_seed(0)
    a = torch.randn(4096, 4096, device=dev)
    expected = (a @ a).sum().item()
    for _ in range(20):
        x = torch.randn(4096, 4096, device=dev)
        y = x @ x  # queued; reads x
        total = y.sum()
        del x  # x's block goes back to the allocator while the matmul may still read it
        got, failed = decode_rows(raw, dev)
        assert failed == []
        for g, w in zip(got, want):
            assert (g.cpu().int() - w.int()).abs().max() <= 3  # nvJPEG and libjpeg differ by a level or two
        assert torch.isfinite(total).item()
        check = (a @ a).sum().item()
        assert check == pytest.approx(expected, rel=1e-5)  # a tensor the decode must not overwrite
