"""End-to-end speed: the 2020 report's pipeline against mlc's, on the same real JPEGs, side by side in one run.

Three ways to push the same images through ResNet50 at depth 1 (layer4 + head train), for training and
for prediction:

- ``2020``: the report's pipeline rebuilt as it was: PIL -> Resize((224, 224)) -> ToTensor -> Normalize
  in one DataLoader worker, float32 tensors between processes, fp32 NCHW, Adam, ``loss.item()`` each
  step, frozen stages still in train mode.
- ``mlc``: mlc's own loader and loop as ``jobs/train.py`` runs them with default flags (uint8 from the
  loader workers, normalisation on the device, JPEG draft decode, loader workers and precision chosen
  as ``--loader-workers``/``--amp auto`` choose them, channels_last, fused AdamW, no per-step sync;
  prediction under inference_mode with BatchNorm folded into the convolutions).
- ``model only``: the same model, precision and optimizer on random tensors already in memory: the
  ceiling the pipeline can reach on this machine.

Every pass skips its first batch (worker start-up) and times the rest; the passes of all pipelines
are interleaved ``repeats`` times and each keeps its best, so a slow spell of a shared machine hits all
of them alike. Peak memory is the peak resident set of this process plus its loader workers during
each pass.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from mlc.data.transforms import IMAGENET_MEAN, IMAGENET_STD


class _Style2020(Dataset):
    def __init__(self, paths, num_classes):
        self.paths = paths
        self.tf = T.Compose([T.Resize((224, 224)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.y = (np.random.default_rng(0).random((len(paths), num_classes)) < 0.15).astype(np.float32)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.tf(Image.open(self.paths[i]).convert("RGB")), torch.from_numpy(self.y[i])


class _PeakRSS:
    """Peak resident memory of this process and its children (loader workers), sampled every 50 ms."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        pids = [os.getpid()]
        try:
            for task in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{task}/children") as f:
                    pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
        total = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError):
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def _timed(counts) -> tuple[int, float]:
    """Images and seconds over all steps but the first (start-up); ``counts`` runs one step per item."""
    n, t0 = 0, None
    for k, c in enumerate(counts):
        if k == 0:
            t0 = time.perf_counter()
        else:
            n += c
    return n, time.perf_counter() - t0


def _model_2020(num_classes):
    from torchvision.models import resnet50
    torch.manual_seed(0)
    m = resnet50(num_classes=num_classes)
    for name, p in m.named_parameters():
        p.requires_grad_(name.startswith(("layer4", "fc")))
    return m


class Bench:
    """The three pipelines over ``paths``; ``pass_(name, kind)`` runs one timed pass."""

    def __init__(self, paths, *, batch_size: int = 16, image_size: int = 224, num_classes: int = 18, log=print):
        from mlc.data.loader import resolve_loader_workers
        from mlc.train.engine import StepContext, make_optimizer
        from mlc.model.resnet import build_model, trainable_parameter_groups
        from mlc.model.precision import NAMES, pick_amp_dtype
        from mlc.model.device import available_cpus
        self.paths, self.batch_size, self.image_size, self.num_classes = list(paths), batch_size, image_size, num_classes
        self.device = torch.device("cpu")
        self.amp = {k: pick_amp_dtype("auto", self.device, kind=k, unfrozen_depth=1, image_size=image_size, log=log)
                    for k in ("train", "predict")}
        self.workers = resolve_loader_workers(None, available_cpus(), self.device)
        log(f"mlc defaults here: precision train {NAMES[self.amp['train']]}, predict {NAMES[self.amp['predict']]}; "
            f"{self.workers} loader worker(s); torch {torch.get_num_threads()} threads")
        self.old = _model_2020(num_classes)
        self.old_opt = torch.optim.Adam([p for p in self.old.parameters() if p.requires_grad], lr=1e-4)
        torch.manual_seed(0)
        self.new = build_model(num_classes, 1, dropout=0.0, weights="none").to(memory_format=torch.channels_last)
        self.new_opt = make_optimizer(trainable_parameter_groups(self.new, 0.01), "adamw", 1e-4, device=self.device)
        self.steps = StepContext(self.new_opt, None, self.device, self.amp["train"], clip_grad=1.0)
        self.y = (np.random.default_rng(0).random((len(self.paths), num_classes)) < 0.15).astype(np.float32)

    # -- the 2020 pipeline
    def _old_loader(self, shuffle):
        return DataLoader(_Style2020(self.paths, self.num_classes), batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=1, drop_last=shuffle)

    def old_train(self):
        self.old.train()
        crit = torch.nn.BCEWithLogitsLoss()

        def step(b):
            x, y = b
            loss = crit(self.old(x), y)
            self.old_opt.zero_grad()
            loss.backward()
            self.old_opt.step()
            loss.item()  # the report logged the loss of every step
            return x.shape[0]
        return _timed((step(b) for b in self._old_loader(True)))

    def old_predict(self):
        self.old.eval()

        def step(b):
            with torch.no_grad():
                torch.sigmoid(self.old(b[0])).numpy()
            return b[0].shape[0]
        return _timed((step(b) for b in self._old_loader(False)))

    # -- mlc's pipeline
    def _new_loader(self, train: bool):
        from mlc.data.loader import make_loader
        from mlc.data.sources import StreamTable
        from mlc.data.transforms import eval_transform, train_transform
        tf = train_transform(self.image_size) if train else eval_transform(self.image_size)
        source = StreamTable(self.paths, self.y if train else None, tf, 50_000_000)
        return make_loader(source, self.batch_size, shuffle=train, seed=0, epoch=1, num_workers=self.workers,
                           drop_last=train)

    def new_train(self):
        from mlc.train.engine import train_one_epoch
        loader = self._new_loader(True)
        counted = TimedAfterFirst(loader)
        train_one_epoch(self.new, counted, self.steps, epoch=1, progress=False)
        return counted.result()

    def new_train_spot(self):
        """mlc's training with what a Spot-native run adds to every step in one process: the step's own random
        seed and a poll for notices (SIGTERM, SIGINT) with the checkpoint schedule after it."""
        from mlc.train.engine import EpochHooks, train_one_epoch
        from mlc.train.interrupts import Schedule, SignalListener
        from mlc.train.loop import step_seed
        schedule, signals = Schedule("auto"), SignalListener()

        def after(step, totals):
            schedule.proposal(step)
            signals.notice()
        counted = TimedAfterFirst(self._new_loader(True))
        hooks = EpochHooks(seed=lambda step: step_seed(0, 1, step, 0), after=after)
        train_one_epoch(self.new, counted, self.steps, epoch=1, progress=False, hooks=hooks)
        return counted.result()

    def new_train_stored(self):
        """mlc's training from its second epoch on: every image already in the decode-once store (filled once,
        untimed, at the first call)."""
        from mlc.data.loader import make_loader
        from mlc.train.engine import train_one_epoch
        source = self._stored_table()
        loader = make_loader(source, self.batch_size, shuffle=True, seed=0, epoch=2, num_workers=self.workers,
                             drop_last=True)
        counted = TimedAfterFirst(loader)
        train_one_epoch(self.new, counted, self.steps, epoch=2, progress=False)
        return counted.result()

    def _stored_table(self):
        from mlc.data.sources import StoredTable
        from mlc.data.store_choice import open_for_run
        from mlc.data.transforms import train_transform
        if getattr(self, "_stored", None) is None:
            self.store = open_for_run(self.paths, self.image_size, "auto", None, log=lambda *_: None)
            if self.store is None:
                raise RuntimeError("no room for the image store on this machine")
            source = StoredTable(self.paths, self.y, train_transform(self.image_size), 50_000_000, self.store,
                                 np.arange(len(self.paths)))
            for k in range(0, len(self.paths), 64):
                source.batch(list(range(k, min(k + 64, len(self.paths)))))
            self._stored = source
        return self._stored

    def close(self) -> None:
        if getattr(self, "store", None) is not None:
            self.store.close()
            self.store = None

    def new_predict(self):
        from mlc.prediction.scores import predict_scores
        counted = TimedAfterFirst(self._new_loader(False))
        predict_scores(self.scorer(), counted, self.device, n_rows=len(self.paths), amp_dtype=self.amp["predict"],
                       progress=False)
        return counted.result()

    def scorer(self):
        """The model as mlc's prediction paths run it: BatchNorm folded into the convolutions, weights in the
        prediction precision."""
        from mlc.model.resnet import fold_batchnorm
        return fold_batchnorm(self.new, self.amp["predict"])

    # -- model only
    def model_train(self):
        from mlc.model.precision import autocast
        x = torch.randn(self.batch_size, 3, self.image_size, self.image_size).contiguous(
            memory_format=torch.channels_last)
        y = torch.from_numpy(self.y[: self.batch_size])
        steps = len(self.paths) // self.batch_size
        self.new.train()

        def step(_):
            with autocast(self.device, self.amp["train"]):
                logits = self.new(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
            self.new_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.new_opt.step()
            return self.batch_size
        return _timed((step(k) for k in range(steps)))

    def model_predict(self):
        from mlc.model.precision import autocast
        x = torch.randn(self.batch_size, 3, self.image_size, self.image_size).contiguous(
            memory_format=torch.channels_last)
        steps = -(-len(self.paths) // self.batch_size)
        model = self.scorer()

        def step(_):
            with torch.inference_mode(), autocast(self.device, self.amp["predict"]):
                torch.sigmoid(model(x).float())
            return self.batch_size
        return _timed((step(k) for k in range(steps)))


class TimedAfterFirst:
    """Wraps a loader to time everything after its first batch, as :func:`_timed` does; ``sync`` waits for
    the device (CUDA) before the clock starts."""

    def __init__(self, loader, sync=None):
        self.loader, self.n, self.t0, self.sync = loader, 0, None, sync

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for k, b in enumerate(self.loader):
            if k >= 1:
                self.n += len(b)
            yield b
            if k == 0:  # the consumer is done with the first batch: time from here, as _timed does
                if self.sync is not None:
                    self.sync()
                self.t0 = time.perf_counter()

    def result(self):
        return self.n, time.perf_counter() - self.t0


def run(paths, *, repeats: int = 2, batch_size: int = 16, image_size: int = 224, log=print) -> dict:
    """Interleaved passes of every pipeline; the best img/s and the peak memory of each."""
    bench = Bench(paths, batch_size=batch_size, image_size=image_size, log=log)
    plan = [("2020", "train", bench.old_train), ("mlc", "train", bench.new_train),
            ("mlc spot", "train", bench.new_train_spot),
            ("mlc store", "train", bench.new_train_stored), ("model only", "train", bench.model_train), ("2020", "predict", bench.old_predict),
            ("mlc", "predict", bench.new_predict), ("model only", "predict", bench.model_predict)]
    best: dict = {}
    passes: dict = {}  # (name, kind) -> img/s of each pass, in order: pass k of each pipeline ran side by side
    try:
        _passes(plan, repeats, best, passes, log)
    finally:
        bench.close()
    return {"rows": best, "passes": passes, "amp": {k: str(v) for k, v in bench.amp.items()},
            "loader_workers": bench.workers}


def _passes(plan, repeats: int, best: dict, passes: dict, log) -> None:
    for rep in range(repeats):
        for name, kind, fn in plan:
            with _PeakRSS() as mem:
                n, seconds = fn()
            r = {"img_s": n / seconds, "images": n, "seconds": seconds, "peak_gb": mem.peak / 2**30}
            log(f"  [{rep + 1}/{repeats}] {kind:<8} {name:<11} {r['img_s']:7.1f} img/s ({n} images in {seconds:.1f} s, "
                f"peak {r['peak_gb']:.2f} GB)")
            key = (name, kind)
            passes.setdefault(key, []).append(r["img_s"])
            if key not in best or r["img_s"] > best[key]["img_s"]:
                best[key] = {**r, "peak_gb": max(r["peak_gb"], best.get(key, {}).get("peak_gb", 0))}


def paired_ratios(passes: dict, kind: str, over: str, name: str = "mlc") -> list[float]:
    """mlc's img/s over ``over``'s ("2020" or "model only") pass by pass: each pair ran back to back, so a slow
    spell of a shared machine hits both sides of a ratio, which the best of each column does not promise."""
    return [a / b for a, b in zip(passes[(name, kind)], passes[(over, kind)])]


def report(out: dict, repeats: int) -> str:
    """:func:`run`'s figures as ``jobs/bench.py --e2e`` prints them: the table, then the ratios pass by pass."""
    import statistics
    rows = out["rows"]
    lines = [f"\nbest of {repeats} interleaved passes; mlc precision {out['amp']}, "
             f"{out['loader_workers']} loader worker(s)\n",
             "| | 2020 pipeline | mlc (default flags) | model only | mlc / 2020 | mlc / model only |\n"
             "|---|---|---|---|---|---|"]
    for kind in ("train", "predict"):
        a, b, c = (rows[(n, kind)]["img_s"] for n in ("2020", "mlc", "model only"))
        lines.append(f"| {kind} img/s | {a:.1f} | {b:.1f} | {c:.1f} | {b / a:.2f}x | {b / c:.0%} |")
        if kind == "train":  # from the second epoch on, mlc reads the decode-once store
            for name, label in (("mlc store", "later epochs (store)"), ("mlc spot", "Spot hooks (seed, poll)")):
                s, a, c = (rows[(n, "train")]["img_s"] for n in (name, "2020", "model only"))
                lines.append(f"| train img/s, {label} | {a:.1f} | {s:.1f} | {c:.1f} | {s / a:.2f}x | {s / c:.0%} |")
    for kind in ("train", "predict"):
        lines.append(f"| {kind} peak memory GB | " + " | ".join(f"{rows[(n, kind)]['peak_gb']:.2f}"
                                                              for n in ("2020", "mlc", "model only")) + " | | |")
    lines.append("\nthe same ratios pass by pass (each pair ran back to back), and their median:")
    r = paired_ratios(out["passes"], "train", "mlc", "mlc spot")
    lines.append("  train    mlc spot  / mlc         " + " ".join(f"{x:.1%}" for x in r)
                 + f"  (median {statistics.median(r):.1%})")
    for name, kind in (("mlc", "train"), ("mlc store", "train"), ("mlc", "predict")):
        for over, fmt in (("2020", "{:.2f}x"), ("model only", "{:.0%}")):
            r = paired_ratios(out["passes"], kind, over, name)
            lines.append(f"  {kind:<8} {name:<9} / {over:<11} " + " ".join(fmt.format(x) for x in r)
                         + f"  (median {fmt.format(statistics.median(r))})")
    return "\n".join(lines)
