"""The job entry points: --help, flag handling, and the README's main command on the demo data."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlc.cli import config_from_args
from mlc.config import TrainConfig
from mlc.data.demo import DEMO_DEFAULTS
from mlc.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))
import train as train_job  # noqa: E402


def run(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.mark.parametrize("job", sorted(p.stem for p in (REPO / "jobs").glob("*.py")))
def test_every_job_has_a_help_that_shows_defaults(job):
    r = run(f"jobs/{job}.py", "--help")
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "default" in r.stdout


def test_train_help_documents_every_setting_with_its_default():
    text = run("jobs/train.py", "--help").stdout
    text = re.sub(r"\s+", " ", text)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
    assert "including the stem" in text  # says what depth 4 trains
    assert "demo: none" in text  # the demo default of --weights


def test_flags_build_the_config_demo_defaults_only_without_data():
    p = train_job.get_args_parser()
    demo = config_from_args(p.parse_args(["--local"]))
    assert demo.data is None and demo.weights == DEMO_DEFAULTS["weights"] and demo.image_size == 64
    real = config_from_args(p.parse_args(["--local", "--data", "gs://b/x", "--lr", "0.01"]))
    assert real.weights == "imagenet" and real.image_size == 224 and real.lr == 0.01 and real.unfrozen_depth == 1
    mixed = config_from_args(p.parse_args(["--local", "--image-size", "96"]))
    assert mixed.image_size == 96 and mixed.weights == "none"
    with pytest.raises(UsageError, match="unfrozen-depth must be >= 0"):
        config_from_args(p.parse_args(["--local", "--unfrozen-depth", "-1"]))


def test_bad_flags_fail_before_ray_starts():
    r = run("jobs/train.py", "--num-workers", "0", "--data", "x")
    assert r.returncode != 0 and "--num-workers must be >= 1" in r.stderr
    r = run("jobs/tune.py", "--depths", "1,-1")
    assert r.returncode != 0 and "--depths must be whole numbers >= 0" in r.stderr
    r = run("jobs/tune.py", "--lr-min", "0.1", "--lr-max", "0.01")
    assert r.returncode != 0 and "--lr-min and --lr-max" in r.stderr
    assert "Started a local Ray" not in r.stderr + r.stdout


def test_readme_main_command_beats_the_baseline_on_demo_data(tmp_path):
    """The README's first command, on the embedded demo data: it must print a validation F1 at least
    0.2 above the most-frequent-label-set baseline. About a minute on 2 CPU cores."""
    env = {"MLC_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = run("jobs/train.py", "--local", "--output", str(tmp_path / "demo"), "--quiet", timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"validation F1 \(samples\) ([0-9.]+).*baseline.* F1 ([0-9.]+)", r.stdout)
    assert m, r.stdout[-2000:]
    f1, base = float(m.group(1)), float(m.group(2))
    assert f1 >= base + 0.2, (f1, base)
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["complete"] and abs(metrics["best"]["f1_samples"] - f1) < 1e-3
    assert (tmp_path / "cache" / "demo-v1" / "train.csv").is_file()
    # The demo's hidden test labels score the run's predictions through the scorer job.
    s = run("jobs/score.py", "--predictions", str(tmp_path / "demo" / "predictions.csv"),
            "--truth", str(tmp_path / "cache" / "demo-v1" / "test_labels.csv"), "--json")
    assert s.returncode == 0, s.stderr
    assert json.loads(s.stdout.strip().splitlines()[-1])["f1_samples"] >= base + 0.2


def test_the_flag_table_in_docs_matches_every_parser():
    """docs/flags.md "Flags across jobs": one row per flag, an x under each job that takes it."""
    import predict as predict_job
    import tune as tune_job
    text = (REPO / "docs" / "flags.md").read_text()
    rows = re.findall(r"^\| `(--[a-z0-9-]+)` \|([^|]*)\|([^|]*)\|([^|]*)\|", text, flags=re.M)
    assert rows, "no flag table in docs/flags.md"
    documented = {job: {flag for flag, *cols in rows if cols[i].strip() == "x"}
                  for i, job in enumerate(("train", "tune", "predict"))}
    for job, module in (("train", train_job), ("tune", tune_job), ("predict", predict_job)):
        flags = {a.option_strings[0] for a in module.get_args_parser()._actions
                 if a.option_strings and a.option_strings[0] != "-h"}
        assert flags == documented[job], (job, sorted(flags ^ documented[job]))


def test_allowed_values_are_declared_once_and_read_by_validation_help_and_the_docs():
    """A setting's allowed values live in its config field (metadata["choices"]): argparse refuses others,
    the config refuses others, and docs/flags.md names each of them on the flag's row."""
    from mlc.config import choices_of
    text = (REPO / "docs" / "flags.md").read_text()
    p = train_job.get_args_parser()
    by_flag = {a.option_strings[0]: a for a in p._actions if a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        allowed = f.metadata.get("choices")
        if allowed is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        assert choices_of(TrainConfig, f.name) == allowed
        if flag != "--compile":  # a switch with a value: its action checks the same tuple
            assert tuple(by_flag[flag].choices) == allowed, flag
        row = next(line for line in text.splitlines() if line.startswith(f"| `{flag}` |"))
        assert all(v in row for v in allowed), (flag, allowed, row)
        with pytest.raises(ValueError, match=f"{flag} must be"):
            TrainConfig(**{f.name: "nonsense"})
