"""Packed datasets (jobs/pack.py, mlc.data.pack*): written on Ray Data with an unreadable image named, resumed
after a kill, refused onto another pack (exit 4) and when damaged (exit 3, naming the file); read as a --data
like any other with the same vocabulary, split, threshold and, from raw pixels, the same metrics and scores;
the compact store; one request per shard at the GCS proxy."""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mlc.config import TrainConfig
from mlc.data.demo import make_demo_dataset
from mlc.data.pack import MANIFEST, PackError, open_pack
from mlc.data.pack_write import PackOutputError
from mlc.errors import classify
from pack_helpers import pack_here

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(weights="none", image_size=32, batch_size=16, unfrozen_depth=4, dropout=0.0, val_fraction=0.25,
             amp="off", lr=2e-3, warmup_epochs=0.0, seed=3, loader_workers=0)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Images of 40 px: smaller than the 48 px slots of --image-size 32, so a raw pack holds them unchanged."""
    return Path(make_demo_dataset(str(tmp_path_factory.mktemp("src")), n_train=96, n_test=24, image_size=40, seed=2))


@pytest.fixture(autouse=True)
def store_roots(tmp_path, monkeypatch):
    """Stores of this test's own (a sweep elsewhere on the machine may keep the shared roots' stores)."""
    monkeypatch.setenv("MLC_STORE_MEMORY_DIR", str(tmp_path / "mem"))
    monkeypatch.setenv("MLC_STORE_DIR", str(tmp_path / "disk"))


@pytest.fixture(scope="module")
def packs(source, tmp_path_factory) -> dict:
    """The source packed as JPEG slots (several shards a table) and as raw pixels, for --image-size 32."""
    root = tmp_path_factory.mktemp("packs")
    out = {}
    for fmt in ("jpeg", "raw"):
        out[fmt] = str(root / fmt)
        pack_here(data=str(source), output=out[fmt], format=fmt, image_size=32, shard_mb=0.02)
    return out


def _files(folder) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in Path(folder).iterdir()}


def test_the_pack_job_runs_on_ray_names_an_unreadable_image_and_check_data_reads_the_pack(ray_head, tmp_path):
    src = Path(make_demo_dataset(str(tmp_path / "src"), n_train=40, n_test=8, image_size=64, seed=4))
    (src / "data" / "3.jpg").write_bytes(b"<html>an error page saved as an image</html>")
    out = tmp_path / "pack"
    env = dict(os.environ, RAY_ADDRESS=ray_head.address, RAY_AUTH_MODE="token")
    cmd = [sys.executable, "jobs/pack.py", "--data", str(src), "--output", str(out), "--image-size", "32",
           "--shard-mb", "0.01", "--quiet"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / MANIFEST).read_text())
    assert list(manifest["tables"]["train"]["unreadable"]) == ["3.jpg"]
    assert manifest["tables"]["train"]["rows"] == 40 and manifest["tables"]["test"]["rows"] == 8
    assert len(manifest["tables"]["train"]["shards"]) > 1 and "3.jpg" in r.stdout + r.stderr
    c = subprocess.run([sys.executable, "jobs/check_data.py", "--data", str(out), "--json", "--quiet"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    report = json.loads(c.stdout.splitlines()[-1])
    assert c.returncode == 1 and report["images_found"] == 48 and list(report["unreadable_images"]) == ["3.jpg"]
    before = _files(out)
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already holds this source's pack" in again.stdout + again.stderr
    assert _files(out) == before
    # Ray Data prediction from the pack (its rows read by row group in the actors) is the in-process one
    from mlc.prediction.checkpoints import predict_from_checkpoint
    _fit(str(out), tmp_path / "run", inputs="image", epochs=1, val_fraction=0.2, max_bad_fraction=0.05)
    predict_from_checkpoint(str(tmp_path / "run"), data=str(out), output=str(tmp_path / "here"), log=lambda *_: None,
                            progress=False)
    p = subprocess.run([sys.executable, "jobs/predict.py", "--checkpoint", str(tmp_path / "run"), "--data", str(out),
                        "--output", str(tmp_path / "ray"), "--num-workers", "2", "--batch-size", "3", "--quiet"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "on 2 Ray workers" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    here, ray = (np.loadtxt(tmp_path / d / "probabilities.csv", delimiter=",", skiprows=1, usecols=range(1, 7))
                 for d in ("here", "ray"))
    np.testing.assert_allclose(ray, here, atol=1e-5)


def test_a_killed_pack_resumes_keeping_the_shards_it_wrote(source, tmp_path):
    out = tmp_path / "pack"
    first = pack_here(data=str(source), output=str(out), image_size=32, shard_mb=0.02)
    shards = sorted(p for p in out.iterdir() if p.name.startswith("train-0"))
    assert len(shards) >= 3
    (out / MANIFEST).unlink()  # killed before the manifest, after all but the last shard
    shards[-1].unlink()
    kept = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in shards[:-1]}
    time.sleep(0.01)
    second = pack_here(data=str(source), output=str(out), image_size=32, shard_mb=0.02)
    assert {p: (out / p).stat().st_mtime_ns for p in kept} == {p: v[0] for p, v in kept.items()}
    assert (out / shards[-1].name).exists()
    assert second["tables"] == first["tables"] and second["source"] == first["source"]


def test_packing_onto_another_datasets_pack_is_refused_with_exit_4(source, packs, tmp_path):
    other = Path(make_demo_dataset(str(tmp_path / "other"), n_train=40, n_test=8, image_size=64, seed=9))
    before = _files(packs["jpeg"])
    with pytest.raises(PackOutputError, match="another source") as e:
        pack_here(data=str(other), output=packs["jpeg"], image_size=32, shard_mb=0.02)
    assert classify(e.value)[0] == 4 and _files(packs["jpeg"]) == before
    with pytest.raises(PackOutputError):  # the same source at another quality is another pack too
        pack_here(data=str(source), output=packs["jpeg"], image_size=32, shard_mb=0.02, quality=70)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(PackOutputError) as e:
        pack_here(data=str(source), output=str(busy), image_size=32)
    assert classify(e.value)[0] == 4 and (busy / "notes.txt").read_text() == "mine"


def _damage(pack: Path, how: str) -> str:
    """Damage a copy of a pack; returns the files the error may name."""
    manifest = json.loads((pack / MANIFEST).read_text())
    shard = manifest["tables"]["train"]["shards"][1]["file"]
    if how == "version":
        manifest["version"] = 99
        (pack / MANIFEST).write_text(json.dumps(manifest))
        return (MANIFEST,)
    if how == "truncated":
        data = (pack / shard).read_bytes()
        (pack / shard).write_bytes(data[: len(data) // 2])
    elif how == "missing":
        (pack / shard).unlink()
    elif how == "rows":  # the manifest and two shards disagree on their rows (sizes still agree)
        manifest["tables"]["train"]["shards"][1]["rows"] += 1
        manifest["tables"]["train"]["shards"][2]["rows"] -= 1
        (pack / MANIFEST).write_text(json.dumps(manifest))
        return (shard, manifest["tables"]["train"]["shards"][2]["file"])  # a run reads either first
    return (shard,)


@pytest.mark.parametrize("how", ["version", "truncated", "missing", "rows"])
def test_a_damaged_pack_is_refused_naming_the_file_with_exit_3(packs, tmp_path, how):
    from mlc.data.run_data import open_sources, prepare_data
    pack = tmp_path / "pack"
    shutil.copytree(packs["jpeg"], pack)
    names = _damage(pack, how)
    cfg = TrainConfig(data=str(pack), inputs="image", **SMALL)
    with pytest.raises(PackError) as e:
        data = prepare_data(cfg, lambda *_: None)
        train, val, store = open_sources(cfg, data, lambda *_: None)
        store.close()
    assert any(n in str(e.value) for n in names) and classify(e.value)[0] == 3
    if how != "version":
        c = subprocess.run([sys.executable, "jobs/check_data.py", "--data", str(pack), "--quiet"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert c.returncode == 1 and all(n in c.stdout for n in names), c.stdout + c.stderr
    else:
        t = subprocess.run([sys.executable, "jobs/train.py", "--local", "--data", str(pack), "--weights", "none",
                            "--epochs", "1", "--output", str(tmp_path / "run"), "--quiet"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
        errors = [line for line in t.stderr.splitlines() if line.startswith("error:")]
        assert t.returncode == 3 and len(errors) == 1 and names[0] in errors[0] and "version" in errors[0]
        assert not (tmp_path / "run").exists()


def _fit(data: str, out: Path, **kw) -> dict:
    from mlc.train.driver import fit
    summary = fit(TrainConfig(data=data, output=str(out), **{**SMALL, **kw}), fresh=True, log=lambda *_: None,
                  progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"best": summary["best"], "threshold": summary["threshold"], "labels": metrics.get("labels"),
            "val": (out / "best" / "val_probabilities.csv").read_text()}


def test_a_run_whose_test_table_lists_an_image_the_pack_lacks_is_refused_before_training(packs, tmp_path):
    from mlc.data.run_data import prepare_data
    from mlc.errors import DataError
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("ImageID\nnot-packed.jpg\n")
    cfg = TrainConfig(data=packs["jpeg"], test_csv=str(test_csv), inputs="image", **SMALL)
    with pytest.raises(DataError, match=r"1 of the \d+ ImageIDs of the run's two tables are not in the pack .*"
                                        r"'not-packed.jpg'.*give the tables the pack was made from"):
        prepare_data(cfg, lambda *_: None)


def test_a_caption_run_from_a_pack_is_the_run_from_its_source(source, packs, tmp_path):
    a = _fit(str(source), tmp_path / "source", inputs="caption", epochs=2)
    b = _fit(packs["jpeg"], tmp_path / "packed", inputs="caption", epochs=2)
    assert a == b


def test_an_image_run_from_a_raw_pack_is_the_run_from_its_source_and_predicts_the_same(source, packs, tmp_path):
    from mlc.prediction.checkpoints import predict_from_checkpoint
    a = _fit(str(source), tmp_path / "source", inputs="image", epochs=1)
    b = _fit(packs["raw"], tmp_path / "packed", inputs="image", epochs=1)
    assert a == b
    assert (tmp_path / "packed" / "predictions.csv").read_text() == (tmp_path / "source" / "predictions.csv").read_text()
    # The run's report: validation thumbnails from its store, test ones read from the pack by row group
    note = re.search(r"Thumbnails: [^<]*", (tmp_path / "packed" / "report.html").read_text()).group(0)
    assert "decode-once store" in note and "from the image folder" in note, note
    assert "could not be read" not in note, note
    scores = {}
    for name, data in (("source", str(source)), ("packed", packs["raw"])):
        out = tmp_path / f"pred-{name}"
        predict_from_checkpoint(str(tmp_path / "source" / "best"), data=data, output=str(out), log=lambda *_: None,
                                progress=False)
        scores[name] = (out / "probabilities.csv").read_text()
    assert scores["source"] == scores["packed"]


def _allocated(folder: str) -> int:
    return sum(p.stat().st_blocks * 512 for p in Path(folder).iterdir() if p.is_file())


def test_the_compact_store_of_real_images_takes_a_tenth_of_raw_bytes_or_less(real_data, tmp_path):
    """64 real COMP5329 images packed for --image-size 224 (320 px slots): the store chosen for a budget that raw
    pixels overflow keeps JPEG slots, allocating a tenth of the raw store's bytes or less, near its pixels."""
    from mlc.data.run_data import open_sources, prepare_data
    from mlc.data.table import read_table, submission_csv
    train = read_table(str(real_data / "train.csv"))
    test = read_table(str(real_data / "test.csv"))
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "train.csv").write_text(submission_csv(train.ImageID[:64], train.Labels[:64]))
    (tables / "test.csv").write_text("ImageID\n" + "\n".join(test.ImageID[:4]) + "\n")
    pack = str(tmp_path / "pack")
    pack_here(data=str(real_data), images="images", train_csv=str(tables / "train.csv"),
              test_csv=str(tables / "test.csv"), output=pack, image_size=224)
    got = {}
    for form, budget in (("raw", None), ("compact", 0.01)):  # raw: 64 x 307 KB = 19.7 MB, over 10.7 MB
        cfg = TrainConfig(data=pack, inputs="image", store="memory", store_budget=budget,
                          **{**SMALL, "image_size": 224})
        said = []
        data = prepare_data(cfg, lambda *_: None)
        _, val, store = open_sources(cfg, data, said.append)
        try:
            assert (store.compact is not None) == (form == "compact") and any(f"image store: {form}" in s for s in said)
            got[form] = (_allocated(store.folder), val.batch(list(range(len(data.va)))).images.float())
        finally:
            store.close()
    assert got["compact"][0] <= got["raw"][0] / 10, got
    assert (got["compact"][1] - got["raw"][1]).abs().mean() < 1.0  # the same JPEG slots, decoded: equal pixels


def test_the_benchmarks_copies_of_the_real_set_are_rows_and_files_of_their_own(real_data, tmp_path):
    """jobs/bench.py --pack-copies: a dataset the full set's size from the images beside the repo."""
    from mlc.bench.pack import present_images_source
    from mlc.data.table import read_table
    one_tables, one_images = present_images_source(real_data, tmp_path / "one")
    two_tables, two_images = present_images_source(real_data, tmp_path / "two", copies=2)
    one, two = read_table(str(one_tables / "train.csv")), read_table(str(two_tables / "train.csv"))
    assert len(one) == 2008 and len(two) == 2 * len(one) and two.ImageID.is_unique
    labels = dict(zip(one.ImageID, one.Labels))
    assert all(labels[i.split("-", 1)[1]] == labs for i, labs in zip(two.ImageID, two.Labels))
    assert {p.name for p in two_images.iterdir()} == {f"{k}-{p.name}" for k in (0, 1) for p in one_images.iterdir()}
    assert (two_images / "1-7.jpg").read_bytes() == (one_images / "7.jpg").read_bytes()
    assert len(read_table(str(two_tables / "test.csv"))) == 2 * len(read_table(str(one_tables / "test.csv")))


def test_a_pack_on_gcs_is_written_and_read_with_one_request_a_shard(source, gcs, tmp_path, monkeypatch):
    """Packed from gs:// to gs://; the first epoch (every labelled image into the store, the batches cut) makes
    one GET an image from the source and a fixed few from the pack, counted at the proxy."""
    from mlc.bench.pack import first_epoch
    monkeypatch.setenv("MLC_BYTE_CACHE", "off")
    gcs.upload(source, gcs.url("src"))
    pack_here(data=gcs.url("src"), output=gcs.url("pack"), image_size=32)
    manifest = open_pack(gcs.url("pack")).manifest
    assert [len(manifest["tables"][t]["shards"]) for t in ("train", "test")] == [1, 1]
    per_object = first_epoch(gcs.url("src"), 32, lambda: gcs.proxy.count())
    gcs.proxy.reset()
    packed = first_epoch(gcs.url("pack"), 32, lambda: gcs.proxy.count())
    assert per_object["stored"] == packed["stored"] == 96
    assert per_object["requests"] >= 96 and packed["requests"] <= 10, (per_object, packed)
    shard = [p for m, p, _ in gcs.proxy.log if m == "GET" and "train-00000.parquet" in p]
    assert len(shard) == 1 and "alt=media" in shard[0], shard  # the shard's bytes, in one request
    # Each of the pack's files read once: the tables serve the run's rows and the ImageIDs' lookup alike.
    reads = Counter(p.split("?")[0].rsplit("/", 1)[-1] for m, p, _ in gcs.proxy.log if "alt=media" in p)
    assert reads == Counter(["manifest.json", "train-table.parquet", "test-table.parquet", "train-00000.parquet"])


def test_an_opened_pack_reads_a_table_once_hands_out_copies_and_pickles_without_them(packs):
    import pickle

    from mlc.data.pack import read_frame, read_frames
    pack = open_pack(packs["jpeg"])
    read_frames(pack)
    assert set(pack.frames) == {"train", "test"}
    table = Path(packs["jpeg"]) / "train-table.parquet"
    kept = table.read_bytes()
    table.unlink()  # read already: not asked for again
    try:
        first = read_frame(pack, "train")
        first.loc[0, "ImageID"] = "changed"
        assert read_frame(pack, "train").ImageID[0] != "changed"
        sent = pickle.loads(pickle.dumps(pack))
        assert sent.frames == {} and sent.manifest == pack.manifest
        with pytest.raises(PackError, match="train-table.parquet: a file the manifest lists is missing"):
            read_frame(sent, "train")
    finally:
        table.write_bytes(kept)


def test_filling_the_store_reads_each_shard_once_with_a_few_in_flight(packs, monkeypatch):
    """Shards are read ahead of the one being stored (a bucket's latency overlaps the decoding), at most
    READ_AHEAD + 1 at a time (their bytes stay small beside the store), each once."""
    import threading

    from mlc.data import pack_source
    from mlc.data.run_data import open_sources, prepare_data
    real, lock, seen, active = pack_source.read_shard, threading.Lock(), [], {"now": 0, "most": 0}

    def slow(pack, table, k, columns=None):
        with lock:
            seen.append((table, k))
            active["now"] += 1
            active["most"] = max(active["most"], active["now"])
        time.sleep(0.2)  # a remote read: long beside storing a few tiny images
        try:
            return real(pack, table, k, columns)
        finally:
            with lock:
                active["now"] -= 1
    monkeypatch.setattr(pack_source, "read_shard", slow)
    cfg = TrainConfig(data=packs["jpeg"], inputs="image", image_size=32, weights="none", store="memory",
                      loader_workers=0)
    store = open_sources(cfg, prepare_data(cfg, lambda *_: None), lambda *_: None)[2]
    try:
        assert store.count() == 96
    finally:
        store.close()
    shards = len(open_pack(packs["jpeg"]).shards("train"))
    assert shards >= 4 and sorted(seen) == [("train", k) for k in range(shards)]
    assert 2 <= active["most"] <= pack_source.READ_AHEAD + 1, active


def test_the_inputs_comparison_reads_a_pack_as_it_reads_its_source(source, packs, tmp_path):
    """jobs/compare_inputs.py with a pack as --data: every row present, the caption rows on the source's table."""
    from mlc.bench.inputs import compare, linear_baseline
    from mlc.data.table import read_table
    table = compare(packs["jpeg"], str(tmp_path / "cmp"), caption_epochs=1, image_epochs=1, image_size=32,
                    log=lambda *_: None)
    assert table.inputs.tolist() == ["linear baseline (captions)", "caption", "linear baseline (captions)",
                                     "image", "caption", "image+caption"]
    assert table.rows.tolist() == [96] * 6
    from_source = linear_baseline(read_table(str(source / "train.csv")), 0.2, 0)
    assert table.f1_samples[0] == table.f1_samples[2] == from_source["f1_samples"]


def test_a_jpeg_pack_keeps_an_image_the_slot_holds_unchanged_and_encodes_one_it_shrinks(source, packs, tmp_path):
    """40 px images fit the 48 px slots of --image-size 32: their files are packed as they are (the same pixels,
    no second lossy encoding); for --image-size 16 (32 px slots) they are shrunk, then encoded at --quality."""
    import pyarrow.parquet as pq
    rows = pq.read_table(Path(packs["jpeg"]) / "train-00000.parquet", columns=["ImageID", "image"]).to_pylist()
    differ = [r["ImageID"] for r in rows if r["image"] != (source / "data" / r["ImageID"]).read_bytes()]
    assert rows and not differ, (len(rows), differ)
    small = tmp_path / "small"
    pack_here(data=str(source), output=str(small), image_size=16)
    rows = pq.read_table(small / "train-00000.parquet", columns=["ImageID", "image", "width"]).to_pylist()
    assert all(r["width"] < 40 and r["image"] != (source / "data" / r["ImageID"]).read_bytes() for r in rows)


def test_the_f1_pairs_benchmark_trains_each_seed_from_the_source_raw_and_from_the_pack_compact(source, packs, tmp_path):
    from mlc.bench.pack import f1_pairs, paired_summary
    settings = {k: v for k, v in SMALL.items() if k not in ("seed", "image_size")}
    rows = f1_pairs(str(source), packs["jpeg"], 32, [1], str(tmp_path / "runs"), {**settings, "epochs": 1},
                    log=lambda *_: None)
    assert [r["seed"] for r in rows] == [1]
    assert rows[0]["raw"] == _fit(str(source), tmp_path / "oracle", seed=1, epochs=1)["best"]["f1_samples"]
    compact = json.loads((tmp_path / "runs" / "compact_s1" / "config.json").read_text())["train"]
    assert compact["data"] == packs["jpeg"] and compact["store_budget"] > 0 and compact["store"] == "memory"
    s = paired_summary([{"raw": 0.5, "compact": 0.6}, {"raw": 0.7, "compact": 0.7}, {"raw": 0.8, "compact": 0.75}])
    assert (s["seeds"], s["raw"], s["compact"]) == (3, pytest.approx(2 / 3), pytest.approx(0.6833333))
    d = np.array([0.1, 0.0, -0.05])
    assert s["diff"] == pytest.approx(d.mean()) and s["diff_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
