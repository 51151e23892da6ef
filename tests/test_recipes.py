"""jobs/compare_recipes.py: every variant once per seed on the same splits, a shared run trained once, the summary's
means, standard errors and paired differences, a rerun that trains nothing, and the job end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from test_captions import _dataset


def _fake_fit(calls):
    """Records each config; its metrics are a function of the settings and seed, so the summary can be checked."""
    def fit(cfg, **kw):
        calls.append(cfg)
        f1 = 0.5 + 0.1 * (cfg.loss == "asl") + 0.01 * cfg.seed ** 2 + 0.001 * (cfg.model != "resnet50")
        return {"best_epoch": 1, "best": {"f1_samples": f1, "f1_micro": f1 - 0.1, "f1_macro": f1 - 0.2, "map": 0.3},
                "threshold": {"strategy": "global"}, "seconds": 1.0}
    return fit


def test_each_variant_runs_once_per_seed_and_the_summary_is_by_seed(tmp_path, monkeypatch):
    from mlc.bench import recipes
    from mlc.train import driver
    root = _dataset(tmp_path / "ds", n=30)
    (root / "data" / "0.jpg").unlink()  # left out of the image groups only
    calls = []
    monkeypatch.setattr(driver, "fit", _fake_fit(calls))
    kw = dict(images="data", seeds=(0, 1, 2), image_size=32, backbones=("test_convnext",), log=lambda *_: None)
    results = recipes.run_all(str(root), str(tmp_path / "rec"), **kw)

    names = [v.name for v in recipes.variants(recipes.GROUPS, backbones=("test_convnext",))]
    assert names.count("image_resnet50_bce") == 2  # in images and in backbones: one run per seed serves both
    assert len(calls) == 3 * len(set(names))
    assert sorted(zip(results.name, results.seed)) == sorted({(n, s) for n in names for s in (0, 1, 2)})
    assert set(results[results.group == "captions"].rows) == {30} and set(results[results.group != "captions"].rows) == {29}
    by = {(c.output.rsplit("/", 1)[-1]): c for c in calls}
    c = by["caption_bce_pw-auto_ema-0.999_s1"]
    assert (c.loss, c.pos_weight, c.ema, c.seed, c.inputs, c.weights, c.train_csv) == ("bce", "auto", 0.999, 1, "caption",
                                                                                      "none", None)
    c = by["image_test_convnext_bce_s2"]
    assert (c.model, c.inputs, c.image_size, c.dropout, c.seed, c.unfrozen_depth >= 7) == ("test_convnext", "image", 32,
                                                                                           0.0, 2, True)
    assert c.train_csv.endswith("subset/train.csv")

    summary = recipes.summarize(results, backbones=("test_convnext",))
    assert summary.variant.tolist() == names
    row = summary.set_index("variant").loc["caption_asl_pw-none_ema-0"]
    asl = np.array([0.6 + 0.01 * s ** 2 for s in (0, 1, 2)])
    bce = asl - 0.1
    assert row.f1_samples == pytest.approx(asl.mean())
    assert row.f1_samples_se == pytest.approx(asl.std(ddof=1) / math.sqrt(3))
    assert row.d_samples == pytest.approx(0.1) and row.d_samples_se == pytest.approx(0, abs=1e-12)  # paired: seed cancels
    assert row.d_macro == pytest.approx(0.1) and row.f1_macro == pytest.approx(asl.mean() - 0.2)
    fused = summary[summary.variant == "image_caption_resnet50_asl"].iloc[0]
    assert fused.d_samples == pytest.approx(0.1)  # against image+caption with bce, not against the image network
    convnext = summary.set_index("variant").loc["image_test_convnext_bce"]
    assert convnext.d_samples == pytest.approx(0.001) and convnext.group == "backbones"
    table = recipes.markdown(summary)
    assert table.count("\n") == len(summary) + 1 and table.count("reference") == 8  # captions, image, image+caption, backbones

    calls.clear()
    again = recipes.run_all(str(root), str(tmp_path / "rec"), **kw)
    assert calls == [] and len(again) == len(results)
    assert len((tmp_path / "rec" / "results.jsonl").read_text().splitlines()) == len(results)

    # Other table-wide settings: refused before anything is written, the subset the runs point to included.
    from mlc.model.checkpoint import ConfigMismatch
    subset = (tmp_path / "rec" / "subset" / "train.csv").read_text()
    (root / "data" / "1.jpg").unlink()  # a new subset would lose this row
    with pytest.raises(ConfigMismatch, match="image_size: 32 there, 48 now"):
        recipes.run_all(str(root), str(tmp_path / "rec"), **{**kw, "image_size": 48})
    assert (tmp_path / "rec" / "subset" / "train.csv").read_text() == subset and calls == []


def test_image_groups_without_images_are_a_data_error_not_a_captions_only_table(tmp_path, monkeypatch):
    from mlc.bench import recipes
    from mlc.errors import DataError
    from mlc.train import driver
    root = _dataset(tmp_path / "ds", n=30)
    calls = []
    monkeypatch.setattr(driver, "fit", _fake_fit(calls))
    with pytest.raises(DataError, match="check --images, or give --groups captions"):
        recipes.run_all(str(root), str(tmp_path / "rec"), images="elsewhere", groups=("captions", "images"),
                        log=lambda *_: None)
    assert calls == []


def test_the_job_trains_the_caption_group_and_prints_the_table(tmp_path):
    root = _dataset(tmp_path / "ds", n=30)
    r = subprocess.run([sys.executable, "jobs/compare_recipes.py", "--data", str(root), "--output", str(tmp_path / "o"),
                        "--groups", "captions", "--seeds", "0", "--caption-epochs", "1", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {x["seed"] for x in rows} == {0}
    meta = json.loads((tmp_path / "o" / "runs" / "caption_asl_pw-none_ema-0.999_s0" / "best" / "meta.json").read_text())
    assert (meta["config"]["loss"], meta["config"]["ema"]) == ("asl", 0.999)
    assert r.stdout.count("| captions |") == 6

    results = (tmp_path / "o" / "results.jsonl").read_text()
    r = subprocess.run([sys.executable, "jobs/compare_recipes.py", "--data", str(root), "--output", str(tmp_path / "o"),
                        "--groups", "captions", "--seeds", "0,1", "--caption-epochs", "2", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 8, r.stderr  # 1-epoch rows would be averaged with 2-epoch ones
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "caption_epochs: 1 there, 2 now" in error and "--output" in error, error
    assert (tmp_path / "o" / "results.jsonl").read_text() == results


def test_an_unknown_group_is_a_usage_error(tmp_path):
    r = subprocess.run([sys.executable, "jobs/compare_recipes.py", "--data", str(tmp_path), "--groups", "nope",
                        "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --groups: unknown group 'nope'")
    assert not (tmp_path / "o").exists()
