"""jobs/check_data.py (mlc.data.check): the real dataset folder, and small datasets in the real format."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

REAL_LABEL_COUNTS = {"1": 22797, "2": 1164, "3": 4365, "4": 1272, "5": 1132, "6": 1395, "7": 1221, "8": 2210,
                     "9": 1042, "10": 1471, "11": 604, "13": 605, "14": 252, "15": 1934, "16": 1099, "17": 1430,
                     "18": 1525, "19": 1020}


@pytest.fixture(scope="module")
def check_job():
    spec = importlib.util.spec_from_file_location("mlc_test_jobs_check_data", REPO / "jobs" / "check_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_real_dataset(real_data, real_train):
    if not (real_data / "images").is_dir():
        pytest.skip(f"{real_data / 'images'} not present")
    res = subprocess.run([sys.executable, "jobs/check_data.py", "--data", str(real_data), "--images", "images",
                          "--json", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    r = _last_json(res.stdout)
    assert r["train_rows"] == 30000
    assert r["test_rows"] == 10000
    assert r["images"] == str(real_data / "images")
    assert r["images_found"] == 2511
    assert r["missing_images"] == 37489
    assert r["unreadable_images"] == {}
    assert len(r["labels"]) == 18
    assert list(r["labels"]) == [str(i) for i in range(1, 20) if i != 12]
    assert max(r["labels"], key=r["labels"].get) == "1"
    # the counts agree with the parsed table
    counted = {}
    for labs in real_train.Labels:
        for lab in labs:
            counted[lab] = counted.get(lab, 0) + 1
    assert r["labels"] == counted == REAL_LABEL_COUNTS
    assert sum(r["labels_per_image"].values()) == 30000
    assert r["labels_per_image"]["1"] == sum(len(labs) == 1 for labs in real_train.Labels)
    assert r["missing_examples"][:3] == ["2000.jpg", "2001.jpg", "2002.jpg"]
    assert len(r["problems"]) == 1 and "37489 of 40000 images are missing" in r["problems"][0]
    assert "problems:" in res.stdout


# ---------------------------------------------------------------------------------------------
# small datasets in the real format

TRAIN = ('ImageID,Labels,Caption\n'
         '0.jpg,1,"A person on a beach."\n'
         '1.jpg,1 19,"A sign labeled "Seltzer Way," by a horse."\n'
         '2.jpg,3 1 11,"A caption that\nspans two lines."\n'
         '3.jpg,18,"A dog."\n')
TEST = ('ImageID,Caption\n'
        '30000.jpg,"Stop sign with added "war" annotation, at an intersection."\n'
        '30001.jpg,"A cat on a boogie/body board."\n')
ALL_IDS = ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "30000.jpg", "30001.jpg"]


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8), "RGB").save(buf, "JPEG")
    return buf.getvalue()


def _dataset(root: Path, *, corrupt=(), missing=()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text(TRAIN, encoding="utf-8")
    (root / "test.csv").write_text(TEST, encoding="utf-8")
    images = root / "data"
    images.mkdir()
    for k, name in enumerate(ALL_IDS):
        if name in missing:
            continue
        (images / name).write_bytes(b"<html>not an image</html>" if name in corrupt else _jpeg(k))
    return root


def _run_main(check_job, root: Path, capsys, *extra):
    args = check_job.get_args_parser().parse_args(["--data", str(root), "--json", "--quiet", *extra])
    rc = check_job.main(args)
    out = capsys.readouterr().out
    return rc, out, _last_json(out)


def test_small_dataset_with_problems(check_job, tmp_path, capsys):
    root = _dataset(tmp_path / "ds", corrupt={"1.jpg"}, missing={"30001.jpg"})
    rc, out, r = _run_main(check_job, root, capsys)
    assert rc == 1
    assert r["train_rows"] == 4 and r["test_rows"] == 2
    assert r["labels"] == {"1": 3, "3": 1, "11": 1, "18": 1, "19": 1}
    assert r["labels_per_image"] == {"1": 2, "2": 1, "3": 1}
    assert r["images_found"] == 5
    assert r["missing_images"] == 1
    assert r["missing_examples"] == ["30001.jpg"]
    assert list(r["unreadable_images"]) == ["1.jpg"]
    assert len(r["problems"]) == 2
    problems = " | ".join(r["problems"])
    assert "30001.jpg" in problems and "1.jpg (" in problems
    # exactly the corrupt and missing names, no good image listed
    for good in ("0.jpg", "2.jpg", "3.jpg", "30000.jpg"):
        assert good not in r["unreadable_images"] and good not in r["missing_examples"]
        assert f" {good}" not in problems
    assert "5 found, 1 missing, 1 unreadable" in out


def test_small_clean_dataset(check_job, tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    rc, out, r = _run_main(check_job, root, capsys)
    assert rc == 0
    assert "no problems found" in out
    assert r["problems"] == []
    assert r["images_found"] == 6 and r["missing_images"] == 0 and r["unreadable_images"] == {}


def test_small_dataset_bad_table(check_job, tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    (root / "train.csv").write_text(TRAIN + '0.jpg,2,"again"\n', encoding="utf-8")
    rc, out, r = _run_main(check_job, root, capsys)
    assert rc == 1
    assert "train_rows" not in r and r["test_rows"] == 2
    assert any(f"{root / 'train.csv'}, line 7:" in p and "duplicate ImageID '0.jpg'" in p for p in r["problems"])


def test_missing_image_folder(check_job, tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    rc, out, r = _run_main(check_job, root, capsys, "--images", "no_such_folder")
    assert rc == 1
    assert r["missing_images"] == 6
    assert any("no_such_folder does not exist" in p for p in r["problems"])


def test_cli_small_dataset_subprocess(tmp_path):
    root = _dataset(tmp_path / "ds", corrupt={"3.jpg"})
    res = subprocess.run([sys.executable, "jobs/check_data.py", "--data", str(root), "--json", "--quiet"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    r = _last_json(res.stdout)
    assert list(r["unreadable_images"]) == ["3.jpg"] and r["missing_images"] == 0
