"""The README's Python example runs as written, on the demo data, and does what it says."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1, "the README holds one Python example"
    return blocks[0]


def test_import_mlc_loads_neither_torch_nor_ray():
    code = "import sys, mlc; print([m for m in ('torch', 'ray') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_readme_example_trains_predicts_and_loads(tmp_path, monkeypatch):
    import mlc

    monkeypatch.chdir(tmp_path)  # the example writes under runs/ where it runs
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)

    summary, pred, model, vocab, logits = (scope[k] for k in ("summary", "pred", "model", "vocab", "logits"))
    run = tmp_path / "runs" / "nb"
    data = json.loads((run / "metrics.json").read_text())["config"]["data"]
    test = mlc.read_table(data.rstrip("/") + "/test.csv")
    # mlc.fit's test predictions and mlc.predict's, from the checkpoint alone, are the same rows and labels.
    assert summary["test"]["rows"] == len(test) == len(pred)
    assert pred.ImageID.tolist() == test.ImageID.tolist()
    first = mlc.read_table(str(run / "predictions.csv"))
    assert first.Labels.tolist() == pred.Labels.tolist()
    assert 0 <= summary["best"]["f1_samples"] <= 1 and summary["best_epoch"] == 1
    # load_model: the trained weights, one output per label of the vocabulary saved with them.
    assert vocab.labels == json.loads((run / "best" / "labels.json").read_text())["labels"]
    assert tuple(logits.shape) == (2, len(vocab)) and not model.training
    again, again_vocab = mlc.load_model(str(run))
    assert again_vocab.labels == vocab.labels
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert (a == b).all(), k
