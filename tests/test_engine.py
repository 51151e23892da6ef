"""The training step and its inputs: uint8 loader output, global batches dealt to ranks, the zero-loss step of a
rank with no usable image (2 gloo processes), the on-device non-finite skip, fp16 loss scaling, precision choice."""

from __future__ import annotations

import io
import math
import os
from unittest import mock

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torchvision import transforms as T

from mlc.train import engine
from ray_head import free_port
from mlc.model import precision
from mlc.data.batch import Batch, Reads, Skipped
from mlc.data.loader import RankBatches, resolve_loader_workers
from mlc.io.images import decode_image
from mlc.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, to_model_input, train_transform


def _photo(w=640, h=480, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BILINEAR)  # smooth, photo-like content


def test_uint8_loader_output_equals_the_float_path_after_normalisation():
    img = _photo()
    u8 = eval_transform(32)(img)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 32, 32)
    cropped = T.Compose([T.Resize(37, antialias=True), T.CenterCrop(32)])(img)
    # (the eval transform resizes only the crop's box: torchvision's two steps to within a level of rounding)
    assert (u8.int() - T.functional.pil_to_tensor(cropped).int()).abs().max() <= 1
    float_path = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    want = float_path(T.functional.to_pil_image(u8))
    got = to_model_input(u8[None], torch.device("cpu"))
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    # bf16 tolerance: what the model sees under autocast
    torch.testing.assert_close(got[0].bfloat16().float(), want, atol=3e-2, rtol=1e-2)

    torch.manual_seed(3)
    a = train_transform(32)(img)
    torch.manual_seed(3)
    b = T.Compose([T.RandomResizedCrop(32, scale=(0.35, 1.0), antialias=True), T.RandomHorizontalFlip(),
                   T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)
    torch.testing.assert_close(to_model_input(a[None], torch.device("cpu"))[0], b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("w,h", [(640, 480), (480, 640), (300, 300), (1000, 333), (200, 150), (257, 3000)])
def test_the_eval_resize_of_the_crop_box_matches_resize_then_centre_crop(w, h):
    from mlc.data.transforms import ResizeCenterCrop
    img = _photo(w, h, seed=w + h)
    for im in (img, img.convert("L")):
        want = T.functional.pil_to_tensor(T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224)])(im)).int()
        got = T.functional.pil_to_tensor(ResizeCenterCrop(256, 224)(im)).int()
        assert got.shape == want.shape and (got - want).abs().max() <= 1, (w, h, im.mode)
        assert (got != want).float().mean() < 0.1  # rounding, not a shifted crop
    # A resize to the crop's own size: the box ends exactly at the image's edge.
    for size in (1, 2, 3, 7, 224):
        assert ResizeCenterCrop(size, size)(img).size == (size, size)
    # A resize smaller than the crop (CenterCrop pads): torchvision's own steps.
    small = ResizeCenterCrop(20, 32)(img)
    assert torch.equal(T.functional.pil_to_tensor(small),
                       T.functional.pil_to_tensor(T.CenterCrop(32)(T.Resize(20, antialias=True)(img))))


def test_large_jpegs_decode_at_the_size_needed_and_odd_files_still_decode():
    buf = io.BytesIO()
    _photo(2000, 1500).save(buf, "JPEG", quality=95)
    t = eval_transform(224)
    small = decode_image(buf.getvalue(), "big.jpg", draft=t.draft)
    assert min(small.size) >= t.draft and small.size[0] < 2000  # decoded at a reduced scale
    full = decode_image(buf.getvalue(), "big.jpg")
    a, b = t(small).float(), t(full).float()
    assert (a - b).abs().mean() < 3.0  # the same picture, within a few grey levels
    # CMYK JPEG and a PNG named .jpg: draft leaves them alone or handles them
    cmyk = io.BytesIO()
    _photo(800, 600).convert("CMYK").save(cmyk, "JPEG")
    assert decode_image(cmyk.getvalue(), "cmyk.jpg", draft=100).mode == "RGB"
    png = io.BytesIO()
    _photo(300, 200).save(png, "PNG")
    assert decode_image(png.getvalue(), "png.jpg", draft=100).size == (300, 200)


def test_rank_batches_share_each_global_batch_whatever_the_world_size():
    one = RankBatches(23, 8, shuffle=True, seed=1, epoch=2, drop_last=True)
    assert one.global_sizes == [8, 8] and all(len(b) == 8 for b in one.batches)
    for world in (2, 3, 5):
        shares = [RankBatches(23, 8, shuffle=True, seed=1, epoch=2, rank=r, world=world, drop_last=True)
                  for r in range(world)]
        assert {len(s) for s in shares} == {2}  # the same number of steps on every rank
        for k in range(2):
            assert sorted(i for s in shares for i in s.batches[k]) == sorted(one.batches[k])
            assert shares[0].global_sizes[k] == 8
    tiny = [RankBatches(23, 3, shuffle=True, rank=r, world=4, drop_last=True) for r in range(4)]
    assert [len(t.batches[0]) for t in tiny] == [1, 1, 1, 0]  # an empty share still takes the step
    ev = [RankBatches(7, 2, shuffle=False, rank=r, world=2) for r in range(2)]
    assert sorted(i for e in ev for b in e.batches for i in b) == list(range(7))  # every row once, no padding


class Tiny(nn.Module):
    """No BatchNorm and no dropout: a step's result does not depend on how a batch is split over ranks."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _batches(n_steps=4, rows=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (rows, 3, 8, 8), dtype=torch.uint8, generator=g),
             (torch.rand(rows, classes, generator=g) < 0.4).float()) for _ in range(n_steps)]


READS = Reads(images=True, captions=False, side=8)


def _batch(x, y, rows, global_rows, skipped=()) -> Batch:
    """The Batch of ``rows`` of one step's (x, y), as a source makes it."""
    rows = list(rows)
    return Batch(torch.tensor(rows, dtype=torch.long), y[rows] if rows else torch.zeros(0, y.shape[1]), READS,
                 images=x[rows] if rows else None, names=[f"{i}.jpg" for i in rows], skipped=list(skipped),
                 global_rows=global_rows)


def _rank_batches(data, rank, world, bad_step=None, bad_rank=None) -> list:
    """This rank's batches of ``data``'s steps (each step's rows dealt round robin); every row of its share of
    step ``bad_step`` unreadable on rank ``bad_rank``."""
    out = []
    for k, (x, y) in enumerate(data):
        rows = list(range(len(x)))[rank::world]
        if k == bad_step and rank == bad_rank:
            out.append(_batch(x, y, [], len(x), [Skipped(i, f"img{k}_{i}.jpg", "corrupt image") for i in rows]))
        else:
            out.append(_batch(x, y, rows, len(x)))
    return out


def _ctx(opt, world=1, **kw) -> engine.StepContext:
    return engine.StepContext(opt, None, torch.device("cpu"), clip_grad=1.0, world=world, **kw)


def _ddp_worker(rank, world, port, data, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import datetime
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = Tiny()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = engine.make_optimizer(model.parameters(), "adamw", 0.05, device=torch.device("cpu"))
        # Every image of rank 1's share of step 2 is unreadable: rank 1 has nothing to learn from there.
        loader = _rank_batches(data, rank, world, bad_step=1, bad_rank=1)
        bad = []
        stats = engine.train_one_epoch(ddp, loader, _ctx(opt, world), epoch=1, progress=False,
                                       bad_images=type("B", (), {"add": lambda self, s: bad.extend(s)})())
        # A collective after the epoch: with a rank one step short this would pair with a gradient all-reduce.
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, stats["train_steps"])
        result[rank] = {"steps": gathered, "weights": {k: v.clone() for k, v in model.state_dict().items()},
                        "bad": [s.name for s in bad]}
    finally:
        torch.distributed.destroy_process_group()


def test_a_rank_whose_batch_is_all_unreadable_still_steps_and_matches_one_process():
    data = _batches()
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        result = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, data, result)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
        assert not hung, "a DDP rank hung"
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        r0, r1 = result[0], result[1]
    assert r0["steps"] == r1["steps"] == [4, 4]
    assert len(r1["bad"]) == 2 and r0["bad"] == []
    for k in r0["weights"]:
        torch.testing.assert_close(r0["weights"][k], r1["weights"][k])

    # One process over the same global batches, rank 1's bad rows left out, gets the same weights.
    torch.manual_seed(0)
    model = Tiny()
    opt = engine.make_optimizer(model.parameters(), "adamw", 0.05, device=torch.device("cpu"))
    one = _rank_batches(data, 0, 1)
    x, y = data[1]
    one[1] = _batch(x, y, range(0, len(x), 2), len(x))  # rank 0's rows of step 2 only, over the step's 4 rows
    engine.train_one_epoch(model, one, _ctx(opt), epoch=1, progress=False)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, r0["weights"][k], atol=1e-5, rtol=1e-5)


def _poisoned(data, step):
    out = _rank_batches(data, 0, 1)
    out[step].targets = out[step].targets * float("nan")  # a NaN loss at this step
    return out


def test_a_non_finite_step_is_skipped_on_the_device_and_stops_the_run_at_the_next_check():
    data = _batches(n_steps=6)
    torch.manual_seed(0)
    model = Tiny()
    opt = engine.make_optimizer(model.parameters(), "adamw", 0.05, device=torch.device("cpu"))
    assert opt.defaults["fused"]  # the update is skipped on the device
    seen = []

    def counting_item(t):
        seen.append(1)
        return t.tolist()
    with mock.patch.object(torch.Tensor, "item", counting_item):
        with pytest.raises(engine.NonFiniteLossError, match=r"epoch 1 step 3") as e:
            engine.train_one_epoch(model, _poisoned(data, 2), _ctx(opt), epoch=1, progress=False, log_every=4)
    assert "['0.jpg', '1.jpg', '2.jpg', '3.jpg']" in str(e.value)  # names the batch
    assert len(seen) <= 2  # host reads at the log point only, not once per step
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert all(torch.isfinite(s["exp_avg"]).all() for s in opt.state.values())

    # Same weights as a run that never took the bad step, stopped at the same point (4 steps, the 3rd skipped).
    torch.manual_seed(0)
    ref = Tiny()
    ref_opt = engine.make_optimizer(ref.parameters(), "adamw", 0.05, device=torch.device("cpu"))
    clean = _rank_batches(data[:2] + data[3:4], 0, 1)
    engine.train_one_epoch(ref, clean, _ctx(ref_opt), epoch=1, progress=False)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref.state_dict()[k])


def test_fp16_loss_scaling_skips_overflowing_steps_without_stopping_but_stops_on_a_nan_loss():
    data = _batches(n_steps=12)
    torch.manual_seed(0)
    model = Tiny()
    opt = engine.make_optimizer(model.parameters(), "adamw", 0.05, device=torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)  # overflows fp16 gradients until it backs off
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = engine.train_one_epoch(model, _rank_batches(data, 0, 1), _ctx(opt, amp_dtype=torch.float16, scaler=scaler),
                                   epoch=1, progress=False)
    assert stats["train_steps"] == 12 and math.isfinite(stats["train_loss"])
    assert scaler.get_scale() < 2.0 ** 20  # the scaler skipped steps and backed off
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # later steps applied
    with pytest.raises(engine.NonFiniteLossError):
        engine.train_one_epoch(model, _poisoned(data, 1),
                               _ctx(opt, amp_dtype=torch.float16, scaler=torch.amp.GradScaler("cpu", init_scale=1.0)),
                               epoch=2, progress=False)


@pytest.mark.parametrize("capability,expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                 ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_precision_on_cuda_follows_the_compute_capability(capability, expected):
    # T4/V100 report bf16 "supported" through emulation; the choice must not trust that.
    with mock.patch("torch.cuda.get_device_capability", return_value=capability), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        got = precision.pick_amp_dtype("auto", torch.device("cuda", 0))
    assert got == expected
    assert precision.needs_grad_scaler(got) == (expected == torch.float16)
    assert precision.pick_amp_dtype("off", torch.device("cuda", 0)) is None


def test_auto_precision_on_cpu_is_measured_once_and_cached(tmp_path):
    calls = []

    def probe(kind, depth, size):
        calls.append((kind, depth))
        return (1.0, 0.5) if kind == "train" else (1.0, 1.02)

    cache = str(tmp_path / "precision.json")
    cpu = torch.device("cpu")
    assert precision.pick_amp_dtype("auto", cpu, kind="train", probe=probe, cache_path=cache) == torch.bfloat16
    assert precision.pick_amp_dtype("auto", cpu, kind="predict", probe=probe, cache_path=cache) is None  # a tie: fp32
    assert len(calls) == 2
    assert precision.pick_amp_dtype("auto", cpu, kind="train", probe=probe, cache_path=cache) == torch.bfloat16
    assert len(calls) == 2  # cached
    assert precision.pick_amp_dtype("auto", cpu, kind="train", unfrozen_depth=4, probe=probe,
                                    cache_path=cache) == torch.bfloat16
    assert len(calls) == 3  # another model setting is measured on its own
    (tmp_path / "precision.json").write_text("{not json")
    assert precision.pick_amp_dtype("auto", cpu, kind="train", probe=probe, cache_path=cache) == torch.bfloat16
    assert len(calls) == 4  # a damaged cache is measured again
    assert precision.pick_amp_dtype("bf16", cpu) == torch.bfloat16  # explicit settings are not probed
    fp32, bf16 = precision.time_cpu_steps("predict", 0, 32, batch_size=2, rounds=1)  # the real probe runs
    assert fp32 > 0 and bf16 > 0


def test_loader_workers_are_sized_where_the_process_runs():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_loader_workers(None, 8, gpu) == 7   # one CPU feeds the GPU, the rest decode
    assert resolve_loader_workers(None, 1, gpu) == 1
    assert resolve_loader_workers(None, 2, cpu) == 0   # on 2 cores the model needs both of them
    assert resolve_loader_workers(None, 8, cpu) == 1
    assert resolve_loader_workers(None, 1, cpu) == 0
    assert resolve_loader_workers(3, 64, gpu) == 3     # an explicit setting wins


def test_ray_actors_take_their_device_from_the_gpus_ray_assigned():
    from mlc.distributed import predict as ray_predict
    with mock.patch("torch.cuda.is_available", return_value=True), mock.patch("ray.get_gpu_ids", return_value=[]):
        assert ray_predict.actor_device() == torch.device("cpu")  # a 0-GPU actor on a GPU node
    with mock.patch("torch.cuda.is_available", return_value=True), mock.patch("ray.get_gpu_ids", return_value=[3]):
        assert ray_predict.actor_device() == torch.device("cuda", 0)
