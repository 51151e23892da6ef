"""The prepared GPU check (jobs/bench.py --gpu) cannot run here; its code path can, on the CPU with tiny settings,
so that it does not rot while no GPU is at hand."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

CPU = torch.device("cpu")


def _photo(folder, i) -> str:
    rng = np.random.default_rng(i)
    img = Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).resize((96, 80), Image.BILINEAR)
    img.save(folder / f"{i}.jpg", "JPEG", quality=95)
    return str(folder / f"{i}.jpg")


def test_the_prepared_gpu_check_runs_through_on_a_cpu_with_tiny_settings(tmp_path, monkeypatch):
    from mlc.bench.gpu import run
    monkeypatch.setenv("MLC_STORE_MEMORY_DIR", str(tmp_path / "store"))
    paths = [_photo(tmp_path, i) for i in range(6)]
    lines = []
    # One depth: depth 4's rows run the same code with another model (the GPU run does both).
    rows = run(CPU, paths, batch=2, size=32, steps=1, budget_s=80, workers=0, amp_setting="off", depths=(4,),
               log=lines.append)
    by = {r["item"]: r for r in rows}
    for item in ("depth 4: model alone", "depth 4: end to end, CPU decode", "depth 4: end to end, store",
                 "depth 4: end to end, compact from pack"):
        assert by[item]["img_s"] > 0, by[item]
    for item in ("depth 4: end to end, store", "depth 4: end to end, compact from pack"):
        assert by[item]["first_epoch_s"] > 0, by[item]
    assert by["predict: end to end, CPU decode"]["img_s"] > 0
    assert all("skipped" in r for k, r in by.items() if "compiled" in k)  # no time left for a compile
    assert any(line.startswith("| depth 4: end to end, store |") and "of the model alone" in line
               and "first epoch" in line for line in lines)
    assert os.listdir(tmp_path / "store") == []  # the store is gone with the check


def test_the_gpu_check_fails_after_its_table_when_a_row_fails(monkeypatch):
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
    assert any(line.startswith("| depth 1: end to end, store | - |") for line in lines)
