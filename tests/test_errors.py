"""Expected failures end a job with ``error: <message>`` and their kind's exit code, no traceback; bugs keep theirs."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlc import errors

REPO = Path(__file__).resolve().parents[1]


def tiny_dataset(root: Path, n_train: int = 12, bad: int = 0) -> Path:
    """A few 40 px images in two colours, label 1 (red) or 2 (blue); the last ``bad`` are not JPEGs."""
    (root / "data").mkdir(parents=True)
    rows = []
    for i in range(n_train + 2):
        label = "1" if i % 2 else "2"
        name = f"{i}.jpg"
        if n_train - bad <= i < n_train:
            (root / "data" / name).write_bytes(b"not a jpeg")
        else:
            colour = (200, 20, 20) if label == "1" else (20, 20, 200)
            Image.fromarray(np.full((40, 40, 3), colour, dtype=np.uint8)).save(root / "data" / name)
        rows.append((name, label))
    (root / "train.csv").write_text("ImageID,Labels,Caption\n" + "".join(f'{n},{lab},"x"\n' for n, lab in rows[:n_train]))
    (root / "test.csv").write_text("ImageID,Caption\n" + "".join(f'{n},"x"\n' for n, _ in rows[n_train:]))
    return root


FAST = ["--weights", "none", "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--unfrozen-depth", "0",
        "--amp", "off", "--loader-workers", "0", "--val-fraction", "0.25"]


def train(*args, timeout=300):
    return subprocess.run([sys.executable, "jobs/train.py", "--local", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def assert_error(r, code: int, fragment: str):
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout


def test_no_images_folder_fails_before_training(tmp_path):
    root = tiny_dataset(tmp_path / "ds")
    r = train("--data", root, "--images", "no_such_folder", "--output", tmp_path / "out", *FAST)
    assert_error(r, errors.DATA, "does not exist")
    assert "epoch" not in r.stdout


def test_none_of_the_listed_images_found_fails_before_training(tmp_path):
    root = tiny_dataset(tmp_path / "ds")
    (root / "other").mkdir()
    r = train("--data", root, "--images", "other", "--output", tmp_path / "out", *FAST)
    assert_error(r, errors.DATA, "none of the first 12 images listed")


def test_missing_table(tmp_path):
    root = tiny_dataset(tmp_path / "ds")
    (root / "train.csv").unlink()
    assert_error(train("--data", root, "--output", tmp_path / "out", *FAST), errors.DATA, "train.csv")


def test_unwritable_output(tmp_path):
    root = tiny_dataset(tmp_path / "ds")
    (tmp_path / "file").write_text("a file, not a folder")
    r = train("--data", root, "--output", tmp_path / "file" / "out", *FAST)
    assert_error(r, errors.OUTPUT, "not writable")


def test_weights_that_cannot_be_read(tmp_path):
    root = tiny_dataset(tmp_path / "ds")
    r = train("--data", root, "--output", tmp_path / "out", *FAST, "--weights", tmp_path / "missing.pt")
    assert_error(r, errors.WEIGHTS, "--weights")


def test_too_many_bad_images_and_verbose_shows_the_traceback(tmp_path):
    root = tiny_dataset(tmp_path / "ds", bad=3)
    r = train("--data", root, "--output", tmp_path / "out", *FAST, "--max-bad-fraction", "0.1", "--quiet")
    assert_error(r, errors.BAD_IMAGES, "images are unreadable")
    r = train("--data", root, "--output", tmp_path / "out2", *FAST, "--max-bad-fraction", "0.1", "--quiet",
              "--verbose")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr  # one or the other
    r = train("--data", root, "--output", tmp_path / "out2", *FAST, "--max-bad-fraction", "0.1", "--verbose")
    assert r.returncode == errors.BAD_IMAGES and "Traceback" in r.stderr and "error: " in r.stderr


def test_bad_setting_is_a_usage_error():
    assert_error(train("--unfrozen-depth", "-1"), errors.USAGE, "--unfrozen-depth must be >= 0")


def test_failures_inside_ray_wrappers_keep_their_kind():
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from mlc.data.run_data import TooManyBadImages
    cause = TooManyBadImages("5 of 10 images are unreadable")
    wrapped = WorkerGroupError("rank 0 failed", {1: RuntimeError("collateral"), 0: RayTaskError("f", "tb", cause)})
    code, exc = errors.classify(wrapped)
    assert code == errors.BAD_IMAGES and errors.message(exc) == "5 of 10 images are unreadable"
    assert errors.classify(WorkerGroupError("boom", {0: RuntimeError("a bug")}))[0] == errors.WORKERS
    assert errors.classify(KeyError("a bug"))[0] is None


def test_a_bug_keeps_its_traceback(tmp_path):
    script = ("import sys; sys.argv=['x']; import argparse\n"
              "from mlc.cli import add_log_args, run_job\n"
              "p = argparse.ArgumentParser(); add_log_args(p)\n"
              "run_job(lambda a: {}['missing'], p)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError" in r.stderr


@pytest.mark.parametrize("code", [errors.USAGE, errors.DATA, errors.OUTPUT, errors.WEIGHTS, errors.BAD_IMAGES,
                                  errors.DIVERGED, errors.RESUME, errors.CLUSTER, errors.WORKERS,
                                  errors.INTERRUPTED, errors.TERMINATED])
def test_every_exit_code_is_documented(code):
    text = (REPO / "docs" / "errors.md").read_text()
    assert f"| {code} |" in text


def test_ray_runs_check_a_weights_path_before_any_worker_starts(tmp_path):
    from mlc.model.resnet import check_weights_found
    check_weights_found("imagenet")  # fetched where the model is built
    (tmp_path / "w.pt").write_bytes(b"x")
    check_weights_found(str(tmp_path / "w.pt"))
    with pytest.raises(Exception) as e:
        check_weights_found(str(tmp_path / "missing.pt"))
    assert errors.classify(e.value)[0] == errors.WEIGHTS and "not found" in str(e.value)
