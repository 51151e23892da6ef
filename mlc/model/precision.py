"""Which floating-point precision the model computes in: ``--amp auto|bf16|fp16|off``.

``auto`` is decided where the work runs (each training process, each prediction actor), never on
the machine that parsed the flags:

- **CUDA.** bf16 autocast on compute capability 8.0 and newer (A100, L4, H100), where the tensor
  cores compute bf16 natively. Below sm80 (T4, V100) ``torch.cuda.is_bf16_supported()`` still says
  True, through emulation, but cuDNN has no bf16 convolutions there: those cards get fp16 autocast
  with a GradScaler (loss scaling) instead.
- **CPU.** Whether bf16 beats fp32 depends on the chip (AMX, AVX512-BF16, neither) and on the
  model's settings, and guessing it from /proc/cpuinfo was measured wrong on our own 2-core dev
  machine (AVX512-BF16, no AMX: guessed fp32, measured bf16 at 1.9-2.1x). So ``auto`` times a
  few training steps (or forward passes, for prediction) of the configured model in both
  precisions, side by side, and keeps the faster. The answer is cached per machine, torch
  version, thread count and model settings, in ``$MLC_PRECISION_CACHE`` (default
  ``~/.cache/mlc/precision.json``), so the probe runs once per machine and setting.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}


def pick_amp_dtype(setting: str, device: torch.device, *, kind: str = "train", unfrozen_depth: int = 1,
                   image_size: int = 224, probe=None, cache_path: str | None = None, log=None):
    """The autocast dtype for ``setting`` on ``device`` (None: fp32). See the module docstring for ``auto``.

    ``kind`` is ``train`` or ``predict``: the CPU probe times what the caller will run. ``probe(kind,
    unfrozen_depth, image_size) -> (fp32 seconds, bf16 seconds)`` replaces the real timing (tests).
    """
    if setting in DTYPES:
        return DTYPES[setting]
    if setting != "auto":
        raise ValueError(f"--amp must be auto, bf16, fp16 or off, got {setting!r}")
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type != "cpu":
        return None  # mps and others: fp32 until measured
    return _cpu_choice(kind, unfrozen_depth, image_size, probe or time_cpu_steps, cache_path, log)


def needs_grad_scaler(amp_dtype) -> bool:
    """fp16's narrow exponent underflows small gradients: its training steps need loss scaling."""
    return amp_dtype == torch.float16


def autocast(device: torch.device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def model_step(model, optimizer, x, y, device, amp_dtype, *, train: bool) -> None:
    """One training step (or one forward pass) of ``model`` on a batch already in memory: what the CPU probe
    below and the benchmarks (mlc.bench.model, mlc.bench.gpu) time, without a loader. (It lives here, not in
    mlc.train.engine, because engine computes under :func:`autocast` and this module must not import it back.)"""
    if train:
        model.train()
        with autocast(device, amp_dtype):
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    else:
        model.eval()
        with torch.inference_mode(), autocast(device, amp_dtype):
            model(x)


def _cache_file(cache_path: str | None) -> str:
    if cache_path:
        return cache_path
    if os.environ.get("MLC_PRECISION_CACHE"):
        return os.environ["MLC_PRECISION_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = os.path.join(xdg, "mlc") if xdg and os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache",
                                                                                     "mlc")
    return os.path.join(base, "precision.json")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_choice(kind, unfrozen_depth, image_size, probe, cache_path, log):
    path = _cache_file(cache_path)
    key = (f"{_cpu_model()}|torch {torch.__version__}|{torch.get_num_threads()} threads|{kind}|"
           f"depth {unfrozen_depth}|{image_size}px")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # One probe per machine at a time: Ray workers that start together on one node would otherwise time
    # each other's contention. The lock is held across read-probe-write; the others then read the answer.
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            cache = _read(path)
            if key in cache:
                return DTYPES[cache[key]["choice"]]
            fp32, bf16 = probe(kind, unfrozen_depth, image_size)
            # A tie goes to fp32: same speed, more precision.
            choice = "bf16" if bf16 < fp32 / 1.05 else "off"
            cache[key] = {"choice": choice, "fp32_s": fp32, "bf16_s": bf16, "measured": time.strftime("%Y-%m-%d")}
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(cache, f, indent=1)
            os.replace(tmp, path)
            if log is not None:
                log(f"precision: bf16 {fp32 / bf16:.2f}x fp32 for {kind} on this CPU ({kind} step timed in both); "
                    f"using {'bf16' if choice == 'bf16' else 'fp32'} (cached in {path})")
            return DTYPES[choice]
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # absent or damaged: measure again


def time_cpu_steps(kind: str, unfrozen_depth: int, image_size: int, *, batch_size: int = 8,
                   rounds: int = 8) -> tuple[float, float]:
    """Seconds per step of the configured ResNet50 (random weights and inputs) on the CPU in fp32 and in bf16:
    training steps or forward passes by ``kind``. The two precisions alternate, step by step, after a
    warm-up step of each, and each keeps its fastest step: other work on a shared machine only ever slows
    a step down, so the minimum is the figure it disturbs least, and alternating exposes both to the
    same spells."""
    from mlc.model.resnet import build_model, trainable_parameter_groups
    device = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(18, unfrozen_depth, dropout=0.0, weights="none").to(memory_format=torch.channels_last)
        x = torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
        y = (torch.rand(batch_size, 18) < 0.15).float()
    opt = torch.optim.AdamW(trainable_parameter_groups(model, 0.01), lr=1e-4)

    def step(amp_dtype) -> float:
        t = time.perf_counter()
        model_step(model, opt, x, y, device, amp_dtype, train=kind == "train")
        return time.perf_counter() - t

    step(None), step(torch.bfloat16)  # warm-up: allocations, kernel selection
    fp32, bf16 = [], []
    for _ in range(rounds):
        fp32.append(step(None))
        bf16.append(step(torch.bfloat16))
    return min(fp32), min(bf16)
