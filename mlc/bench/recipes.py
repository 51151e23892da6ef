"""The training recipe's accuracy table: losses, EMA and backbones, each over several seeds.

Groups (each a list of variants; every variant runs once per seed, on mlc's split with that seed):
- ``captions``: ``--inputs caption`` on every labelled row: bce, asl and bce with ``--pos-weight auto``, each
  without and with EMA;
- ``images``: on the rows whose image is present (such as the 2,008 labelled real images beside the repo), from
  scratch at a small size: ``image`` and ``image+caption``, each with bce and asl;
- ``backbones``: the same rows, ``image`` with bce: ResNet50 beside timm models (the extra ``mlc[timm]``).
Every run is a real training run (:func:`mlc.fit`); its numbers are the best epoch's validation metrics. Results
go to ``output/results.jsonl``, one line per finished run, so an interrupted table resumes where it stopped; the
table-wide settings go to ``output/settings.json``, and a resume with other ones is refused.
The summary gives each variant's mean and standard error over seeds, and its paired differences in samples and
macro F1 against its group's first variant that reads the same inputs (same seeds, same splits), which is what a
choice between them rests on.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import pandas as pd

from mlc.io import storage
from mlc.errors import DataError
from mlc.config import TrainConfig
from mlc.data.run_data import DataPaths, read_tables
from mlc.data.pack import open_pack
from mlc.bench.inputs import scratch_settings, write_present_subset
from mlc.bench.seeds import mean_se

GROUPS = ("captions", "images", "backbones")
METRICS = ("f1_samples", "f1_micro", "f1_macro", "map")
# Small timm models of the two families practitioners reach for first, about ResNet50's cost or less.
DEFAULT_BACKBONES = ("convnext_atto", "efficientnet_b0")


@dataclass(frozen=True)
class Variant:
    group: str
    name: str  # also the run's folder; equal settings give equal names, so a shared run trains once
    settings: dict  # TrainConfig fields on top of the group's base


def variants(groups, *, ema: float = 0.999, backbones=DEFAULT_BACKBONES) -> list[Variant]:
    out = []
    if "captions" in groups:
        for decay in sorted({0.0, ema}):  # --ema 0: the EMA rows are the plain ones
            for loss, pw in (("bce", "none"), ("asl", "none"), ("bce", "auto")):
                out.append(Variant("captions", f"caption_{loss}_pw-{pw}_ema-{decay:g}",
                                   dict(loss=loss, pos_weight=pw, ema=decay)))
    if "images" in groups:
        for inputs in ("image", "image+caption"):
            for loss in ("bce", "asl"):
                out.append(Variant("images", f"{inputs.replace('+', '_')}_resnet50_{loss}",
                                   dict(inputs=inputs, loss=loss)))
    if "backbones" in groups:
        for model in ("resnet50", *backbones):
            out.append(Variant("backbones", f"image_{model}_bce", dict(inputs="image", loss="bce", model=model)))
    return out


def run_all(data: str, output: str, *, images: str | None = None, groups=GROUPS, seeds=(0, 1, 2),
            val_fraction: float = 0.2, caption_epochs: int = 10, image_epochs: int = 8, image_size: int = 64,
            ema: float = 0.999, backbones=DEFAULT_BACKBONES, log=print) -> pd.DataFrame:
    """Train every variant of ``groups`` once per seed (skipping runs already in results.jsonl); the results."""
    # Before anything is written: a refused resume must leave the table's subset and runs as they were.
    local = "://" not in data  # a folder named two ways (relative, absolute) is one table's data
    _check_settings(output, dict(data=os.path.abspath(data) if local else data, images=images, val_fraction=val_fraction, caption_epochs=caption_epochs,
                                 image_epochs=image_epochs, image_size=image_size), log)
    paths = DataPaths.resolve(data, images)
    pack = open_pack(paths.pack) if paths.pack else None
    df, test = read_tables(paths, pack=pack)
    bases = {"captions": dict(data=data, images=images, inputs="caption", weights="none", val_fraction=val_fraction,
                              epochs=caption_epochs)}
    rows = {"captions": len(df)}
    if set(groups) - {"captions"}:
        subset = write_present_subset(paths, pack, df, test, output, log)
        if subset is None:  # a wrong --images, most often: the table must not quietly lose its image groups
            raise DataError(f"--groups {','.join(g for g in groups if g != 'captions')}: fewer than 20 labelled rows "
                            f"of {storage.safe_url(paths.train_csv)} have their image in {storage.safe_url(paths.images)}; check --images, "
                            "or give --groups captions")
        sub_train, sub_test, sub = subset
        scratch = scratch_settings(data, images, sub_train, sub_test, image_size=image_size,
                                   val_fraction=val_fraction, seed=0, model="resnet50")
        bases["images"] = bases["backbones"] = {**scratch, "epochs": image_epochs}
        rows["images"] = rows["backbones"] = len(sub)
    results_path = storage.join(output, "results.jsonl")
    done = _read_results(results_path)
    for seed in seeds:
        for v in variants(groups, ema=ema, backbones=backbones):
            if v.group not in bases or (v.name, seed) in done:
                continue
            cfg = TrainConfig(**{**bases[v.group], **v.settings, "seed": seed,
                                 "output": storage.join(output, "runs", f"{v.name}_s{seed}")})
            done[(v.name, seed)] = _train(cfg, v, seed, rows[v.group], log)
            _append(results_path, done[(v.name, seed)])
    return pd.DataFrame(list(done.values()))


def _train(cfg: TrainConfig, v: Variant, seed: int, rows: int, log) -> dict:
    from mlc.train.driver import fit
    log(f"recipes: {v.name} seed {seed} ({rows} rows)")
    s = fit(cfg, fresh=True, log=log, progress=False)
    row = {"name": v.name, "group": v.group, "seed": seed, "rows": rows, "best_epoch": s["best_epoch"],
           **{k: s["best"][k] for k in METRICS}, "threshold": s["threshold"]["strategy"], "seconds": s["seconds"]}
    log(f"recipes: {v.name} seed {seed}: samples F1 {row['f1_samples']:.4f}, macro {row['f1_macro']:.4f}, "
        f"mAP {row['map']:.4f} ({row['seconds']:.0f} s)")
    return row


def _check_settings(output: str, settings: dict, log) -> None:
    """Refuse to add runs to a table made with other table-wide settings: a resume reads finished runs back by
    name and seed, and rows trained on other data or for other epochs would be averaged and paired as if equal.
    (The per-variant settings, EMA decay and backbones, are in the run names.)"""
    from mlc.model.checkpoint import ConfigMismatch
    path = storage.join(output, "settings.json")
    if storage.exists(path):
        old = json.loads(storage.read_bytes(path))
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            listed = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ConfigMismatch(f"{storage.safe_url(output)} holds a table made with other settings ({listed}); "
                                 "rerun with the same flags to resume it, or give another --output")
        return
    if storage.exists(storage.join(output, "results.jsonl")):
        log(f"recipes: note: {storage.safe_url(output)} has results but no settings.json (an older table); "
            "taking the current settings as theirs")
    storage.write_text(path, json.dumps(settings, indent=1) + "\n")


def _read_results(path: str) -> dict:
    if not storage.exists(path):
        return {}
    out = {}
    for line in storage.read_bytes(path).decode().splitlines():
        if line.strip():
            r = json.loads(line)
            out[(r["name"], r["seed"])] = r
    return out


def _append(path: str, row: dict) -> None:
    # Whole lines, rewritten in full: a killed table never leaves half a line for the next resume to trip on.
    old = storage.read_bytes(path).decode() if storage.exists(path) else ""
    storage.write_text(path, old + json.dumps(row) + "\n")


def summarize(results: pd.DataFrame, groups=GROUPS, *, ema: float = 0.999, backbones=DEFAULT_BACKBONES
              ) -> pd.DataFrame:
    """One row per variant in the order of :func:`variants`: the seeds it has, the mean and standard error of each
    metric, and the paired differences in samples and macro F1 from its reference (its group's first variant that
    reads the same inputs) over the seeds both have."""
    out = []
    for v in variants(groups, ema=ema, backbones=backbones):
        r = results[results.name == v.name].sort_values("seed") if len(results) else results
        if not len(r):
            continue
        ref_name = _reference(v, groups, ema, backbones)
        row = {"group": v.group, "variant": v.name, "rows": int(r.rows.iloc[0]), "seeds": len(r),
               "reference": v.name == ref_name}
        for k in METRICS:
            row[k], row[k + "_se"] = mean_se(r[k])
        ref = results[results.name == ref_name].set_index("seed")
        for k, d in (("f1_samples", "d_samples"), ("f1_macro", "d_macro")):
            paired = (r.set_index("seed")[k] - ref[k]).dropna()
            row[d], row[d + "_se"] = mean_se(paired) if len(paired) else (math.nan, math.nan)
        row["seconds"] = float(r.seconds.mean())
        out.append(row)
    return pd.DataFrame(out)


def _reference(v: Variant, groups, ema, backbones) -> str:
    """The variant ``v`` is compared with: its group's first that reads the same inputs."""
    return next(x.name for x in variants(groups, ema=ema, backbones=backbones)
                if x.group == v.group and x.settings.get("inputs") == v.settings.get("inputs"))


def markdown(summary: pd.DataFrame) -> str:
    lines = ["| group | variant | rows | seeds | samples F1 | micro F1 | macro F1 | mAP | paired diff. samples F1 | "
             "paired diff. macro F1 | seconds |", "|---" * 11 + "|"]
    for r in summary.to_dict("records"):
        cells = [f"{r[k]:.4f} ± {r[k + '_se']:.4f}" for k in METRICS]
        diff = " | ".join("reference" if r["reference"] else f"{r[d]:+.4f} ± {r[d + '_se']:.4f}"
                          for d in ("d_samples", "d_macro"))
        lines.append(f"| {r['group']} | {r['variant']} | {r['rows']} | {r['seeds']} | {' | '.join(cells)} | "
                     f"{diff} | {r['seconds']:.0f} |")
    return "\n".join(lines)
