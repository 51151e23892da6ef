"""Nothing read from outside the data, nothing of a user's lost (issue 25): hostile tables through every job,
--fresh that checks before it replaces, one writer per output, validation before any work, outputs that honour
the umask."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlc import errors
from mlc.data.check import check_dataset, format_report
from mlc.data.run_data import DataPaths, image_urls
from mlc.data.table import TableError
from mlc.io import storage
from mlc.io.lock import LOCK_NAME, OutputLock, OutputLocked, hold
from mlc.train import driver as trainer, loop

from test_trainer import REAL, cfg_for, make_dataset

REPO = Path(__file__).resolve().parents[1]
needs_real = pytest.mark.skipif(not (REAL / "images").is_dir(), reason=f"real data not found at {REAL}")
SECRET = "TOPSECRET-0123456789"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    if not (REAL / "images").is_dir():
        pytest.skip(f"real data not found at {REAL}")
    root = tmp_path_factory.mktemp("safe") / "ds"
    make_dataset(root, n_train=16, n_test=4)
    # Files outside the image folder that a hostile table could name: a real JPEG and a "secret".
    shutil.copy(next((root / "data").iterdir()), root / "outside.jpg")
    (root.parent / "secret.txt").write_text(SECRET + "\n")
    return root


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    """A finished one-epoch run: what --fresh, a resume or a second run must not lose."""
    out = tmp_path_factory.mktemp("finished") / "run"
    trainer.fit(cfg_for(dataset, out, epochs=1), log=lambda *_: None, progress=False)
    return out


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hostile_copy(dataset: Path, tmp_path: Path, table: str, row: str) -> Path:
    root = tmp_path / "hostile"
    shutil.copytree(dataset, root, symlinks=True)
    with open(root / table, "a") as f:
        f.write(row + "\n")
    return root


# --- ids name files inside the image folder ---------------------------------------------------------------


@pytest.mark.parametrize("image_id", ["../outside.jpg", "../../secret.txt", "/etc/hostname"])
def test_training_refuses_a_table_that_names_files_outside_the_image_folder(dataset, tmp_path, image_id):
    root = _hostile_copy(dataset, tmp_path, "train.csv", f'{image_id},1,"a caption"')
    out = tmp_path / "out"
    with pytest.raises(TableError) as e:
        trainer.fit(cfg_for(root, out, epochs=1), log=lambda *_: None, progress=False)
    assert errors.classify(e.value)[0] == errors.DATA
    assert str(root / "train.csv") in str(e.value) and "line 18" in str(e.value) and "inside the image folder" in str(e.value)
    assert not out.exists()  # nothing trained, and no empty output folder left behind


def test_the_test_table_is_held_to_the_same_rule(dataset, tmp_path):
    root = _hostile_copy(dataset, tmp_path, "test.csv", '../outside.jpg,"a caption"')
    with pytest.raises(TableError, match=r"test.csv.*line 6.*'\.\.' would leave the image folder"):
        trainer.fit(cfg_for(root, tmp_path / "out", epochs=1), log=lambda *_: None, progress=False)


@pytest.mark.parametrize("image_id", ["../../secret.txt", "/etc/shadow"])
def test_the_predict_job_refuses_such_ids_and_prints_no_file_content(finished, dataset, tmp_path, image_id):
    ids = tmp_path / "ids.csv"
    ids.write_text(f"ImageID\n{image_id}\n")
    r = subprocess.run([sys.executable, "jobs/predict.py", "--checkpoint", str(finished), "--data", str(dataset),
                        "--ids", str(ids), "--output", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == errors.DATA, r.stderr[-2000:]
    assert r.stderr.startswith("error:") and "line 2" in r.stderr and "inside the image folder" in r.stderr
    assert SECRET not in r.stdout + r.stderr and "root:" not in r.stdout + r.stderr
    assert not (tmp_path / "o").exists()


def test_ids_given_to_the_library_meet_the_same_rule_local_and_gs():
    from mlc.errors import DataError
    assert image_urls("gs://b/images", ["a/1.jpg"]) == ["gs://b/images/a/1.jpg"]
    for root in ("/data/images", "gs://b/images"):
        for bad in ("../x.jpg", "/etc/passwd", "gs://other/x.jpg"):
            with pytest.raises(DataError, match="cannot name an image"):
                image_urls(root, ["1.jpg", bad])  # Ray Data prediction and every scorer go through image_urls


@needs_real
def test_check_data_names_the_row_and_says_where_links_point(dataset, tmp_path):
    root = _hostile_copy(dataset, tmp_path, "train.csv", '../outside.jpg,1,"a caption"')
    report = check_dataset(DataPaths.resolve(str(root)), progress=False)
    assert any("line 18" in p and "'..' would leave the image folder" in p for p in report["problems"])
    assert not any("missing" in p for p in report["problems"])
    # A link its owner put in the folder is read, and the report says where it leads.
    clean = tmp_path / "clean"
    shutil.copytree(dataset, clean)
    first = sorted((clean / "data").iterdir())[0]
    first.unlink()
    first.symlink_to(clean / "outside.jpg")
    report = check_dataset(DataPaths.resolve(str(clean)), progress=False)
    assert report["problems"] == [] and report["symlinks"] == {first.name: str(clean / "outside.jpg") + " (outside the image folder)"}
    assert f"{first.name} -> {clean / 'outside.jpg'}" in format_report(report)
    trainer.fit(cfg_for(clean, tmp_path / "out", epochs=1), log=lambda *_: None, progress=False)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["skipped_images"] == 0  # the link was read


# --- --fresh replaces only after every check has passed -----------------------------------------------------


@pytest.mark.parametrize("broken", ["no data", "no weights", "no images"])
def test_fresh_keeps_the_previous_run_when_the_new_one_fails_its_checks(finished, dataset, tmp_path, broken):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _snapshot(run)
    if broken == "no data":
        cfg = cfg_for(tmp_path / "nonexistent", run)
    elif broken == "no weights":
        cfg = cfg_for(dataset, run, weights=str(tmp_path / "missing.pt"))
    else:
        cfg = cfg_for(dataset, run, images=str(tmp_path / "empty"))
        (tmp_path / "empty").mkdir()
    with pytest.raises(Exception) as e:
        trainer.fit(cfg, fresh=True, log=lambda *_: None, progress=False)
    assert errors.classify(e.value)[0] in (errors.DATA, errors.WEIGHTS), e.value
    assert _snapshot(run) == before


def test_fresh_replaces_the_previous_run_once_the_checks_pass(finished, dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "plots" / "stale.png").write_bytes(b"old")
    logs = []
    trainer.fit(cfg_for(dataset, run, epochs=1, seed=1), fresh=True, log=logs.append, progress=False)
    assert any(line.startswith("--fresh: replacing the previous run") for line in logs)
    assert not (run / "plots" / "stale.png").exists()
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 1


def test_a_resume_that_fails_leaves_the_runs_config_as_it_was(finished, dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _snapshot(run)

    def broken(*a, **k):
        raise RuntimeError("the machine went away")
    monkeypatch.setattr(loop, "train_one_epoch", broken)
    with pytest.raises(RuntimeError, match="went away"):
        trainer.fit(cfg_for(dataset, run, epochs=2), log=lambda *_: None, progress=False)
    assert (run / "config.json").read_bytes() == before["config.json"]
    assert not (run / LOCK_NAME).exists()


def test_outputs_honour_the_umask(finished, tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    expected = 0o666 & ~mask
    for rel in ("predictions.csv", "best/model.pt", "checkpoint/state.pt", "config.json", "metrics.json"):
        assert (finished / rel).stat().st_mode & 0o777 == expected, rel
    old = os.umask(0o027)
    try:
        storage.write_text(str(tmp_path / "f.txt"), "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o640


def test_a_model_file_is_taken_for_its_folder(finished, dataset, tmp_path):
    import mlc
    summary = mlc.predict(str(finished / "best" / "model.pt"), str(dataset), str(tmp_path / "p"),
                          log=lambda *_: None, progress=False)
    assert summary["rows"] == 4 and (tmp_path / "p" / "predictions.csv").read_bytes() == \
        (finished / "predictions.csv").read_bytes()


# --- validation before any work ------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [["--lr", "nan"], ["--lr", "inf"], ["--weight-decay", "nan"],
                                   ["--warmup-epochs", "-1"], ["--momentum", "1.5"]])
def test_non_finite_and_out_of_range_numbers_are_refused_at_parse_time(flags, tmp_path):
    r = subprocess.run([sys.executable, "jobs/train.py", "--local", "--output", str(tmp_path / "o"), *flags],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == errors.USAGE and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert flags[0] in r.stderr and not (tmp_path / "o").exists()


# --- one writer per output -----------------------------------------------------------------------------------

HOLDER = ("import sys, time\nfrom mlc.io.lock import hold\nhold(sys.argv[1], what='a test run').acquire()\n"
          "print('held', flush=True)\ntime.sleep(120)\n")


def _hold_elsewhere(folder) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_on_one_output_is_refused_and_a_dead_holders_lock_is_taken_over(dataset, tmp_path):
    out = tmp_path / "run"
    holder = _hold_elsewhere(out)
    try:
        with pytest.raises(OutputLocked) as e:
            trainer.fit(cfg_for(dataset, out, epochs=1), log=lambda *_: None, progress=False)
        msg = str(e.value)
        assert errors.classify(e.value)[0] == errors.OUTPUT
        assert f"pid {holder.pid}" in msg and "a test run" in msg and "started 20" in msg and "--output/--name" in msg
        assert not (out / "config.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    logs = []  # its holder killed: the lock is stale and the next run takes it over, saying so
    trainer.fit(cfg_for(dataset, out, epochs=1), log=logs.append, progress=False)
    assert any("taking over" in line and f"{holder.pid} on this host has ended" in line for line in logs)
    assert (out / "predictions.csv").is_file() and not (out / LOCK_NAME).exists()


def test_a_lock_from_another_host_holds_until_its_lease_lapses(tmp_path):
    lock = tmp_path / "out" / LOCK_NAME
    lock.parent.mkdir()
    held = {"what": "a run", "host": "elsewhere", "pid": 1, "started": time.time() - 60, "renewed": time.time() - 30,
            "lease_s": 300, "command": "train.py", "token": "t1"}
    lock.write_text(json.dumps(held))
    with pytest.raises(OutputLocked, match="on host elsewhere, pid 1"):
        OutputLock(str(tmp_path / "out")).acquire()
    lock.write_text(json.dumps(dict(held, renewed=time.time() - 301)))
    logs = []
    with hold(str(tmp_path / "out"), log=logs.append):
        assert json.loads(lock.read_text())["host"] != "elsewhere"
        with hold(str(tmp_path / "out")):  # the same process again (a sweep predicting into its folder)
            pass
        assert lock.exists()
    assert not lock.exists() and any("not renewed it for" in line for line in logs)


def test_the_lock_works_on_a_filesystem_without_hard_links(tmp_path, monkeypatch):
    import errno
    from mlc.io import lock as lock_mod

    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(lock_mod.os, "link", no_link)
    with hold(str(tmp_path / "out")):
        assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert OutputLock(str(tmp_path / "out"))._create() is False  # create-only still: a second writer loses
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == []  # released, and no private .lock-* file left


RACER = ("import sys, time\nfrom mlc.io.lock import OutputLock, OutputLocked\nstart = float(sys.argv[2])\n"
         "time.sleep(max(0.0, start - time.time()))\ntry:\n    OutputLock(sys.argv[1]).acquire()\n    print('won')\n"
         "    time.sleep(3)\nexcept OutputLocked:\n    print('lost')\n")


def test_of_runs_that_start_at_once_exactly_one_gets_the_output(tmp_path):
    start = time.time() + 4  # every racer has imported mlc by then
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "out"), str(start)], cwd=REPO,
                               stdout=subprocess.PIPE, text=True) for _ in range(4)]
    results = sorted(p.communicate(timeout=60)[0].strip() for p in racers)
    assert results == ["lost", "lost", "lost", "won"]


def test_the_lock_on_gs(gcs, tmp_path):
    folder = gcs.url("locks/run")
    holder = _hold_elsewhere(folder)
    try:
        with pytest.raises(OutputLocked, match=f"pid {holder.pid}"):
            OutputLock(folder).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    logs = []
    with hold(folder, log=logs.append):
        assert json.loads(storage.read_bytes(storage.join(folder, LOCK_NAME)))["pid"] == os.getpid()
    assert any("taking over" in line for line in logs)
    assert not storage.exists(storage.join(folder, LOCK_NAME))


def test_ray_runs_and_sweeps_take_the_lock_on_the_driver(dataset, tmp_path, ray_head):
    env = {**os.environ, "RAY_ADDRESS": ray_head.address}
    for job, name in (("train.py", "r1"), ("tune.py", "s1")):
        holder = _hold_elsewhere(tmp_path / name)
        try:
            r = subprocess.run([sys.executable, f"jobs/{job}", "--data", str(dataset), "--output", str(tmp_path),
                                "--name", name, "--weights", "none", "--image-size", "32", "--quiet"],
                               cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        assert r.returncode == errors.OUTPUT, r.stderr[-2000:]
        assert f"pid {holder.pid}" in r.stderr and "is in use by" in r.stderr
