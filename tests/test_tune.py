"""The Ray Tune sweep without a cluster: resource planning, the concurrency limit, flags, and the summary with ties,
a best epoch before the last and an errored trial. The real sweep (killed and resumed) is in tests/test_autoscaling.py."""

from __future__ import annotations

import json
from pathlib import Path
import math

import pandas as pd
import pytest

from mlc.distributed.cluster import Cluster, ClusterError, NodeType
from mlc.distributed.tune import SweepConfig, plan_resources, search_algorithm

pytest.importorskip("ray")


def _fixed(*nodes):
    return Cluster(tuple(nodes), None, "test")


# A scale-from-zero cluster as the project ships it: a head with 0 CPUs, Spot GPU workers 0..4.
ZERO = Cluster(({"CPU": 0},), (NodeType("ray_head", {"CPU": 0}, 1), NodeType("gpu", {"CPU": 8, "GPU": 1}, 4)), "test")


def test_a_sweep_no_trial_of_which_fits_fails_before_it_starts():
    with pytest.raises(ClusterError, match="needs 2 worker.*GPU: 1.*at most 0"):
        plan_resources(SweepConfig(workers_per_trial=2, gpus_per_worker=1), _fixed({"CPU": 8}))
    with pytest.raises(ClusterError, match="needs 3 worker"):
        plan_resources(SweepConfig(workers_per_trial=3, cpus_per_worker=2), _fixed({"CPU": 4}))
    # No node type has 2 GPUs: a 2-GPU worker can never start, whatever the autoscaler does.
    with pytest.raises(ClusterError, match="node types"):
        plan_resources(SweepConfig(gpus_per_worker=2), ZERO)
    # An autoscaler this process cannot see may add the nodes: then the trials wait instead.
    plan_resources(SweepConfig(workers_per_trial=2, gpus_per_worker=1, wait_for_autoscaler=True), _fixed({"CPU": 8}))
    # Concurrency is what the cluster holds, never more than the trials.
    assert plan_resources(SweepConfig(num_samples=8, workers_per_trial=2), _fixed({"CPU": 5}))[1] == 2
    assert plan_resources(SweepConfig(num_samples=2), _fixed({"CPU": 16}))[1] == 2
    per_worker, n = plan_resources(SweepConfig(num_samples=8), _fixed({"CPU": 16, "GPU": 4}))
    assert per_worker == {"CPU": 4.0, "GPU": 1.0} and n == 4  # 16 CPUs over 4 GPUs: 4 each, not 8


def test_a_scale_from_zero_cluster_plans_from_its_node_types():
    # No worker node is up, yet the sweep plans GPU workers, 4 at a time, 8 CPUs each (the node type's).
    per_worker, n = plan_resources(SweepConfig(num_samples=8), ZERO)
    assert per_worker == {"CPU": 8.0, "GPU": 1.0} and n == 4
    assert plan_resources(SweepConfig(num_samples=8, workers_per_trial=3), ZERO)[1] == 1
    # Without node types and without GPU nodes up, waiting never guesses CPU workers.
    with pytest.raises(ClusterError, match="--gpus-per-worker"):
        plan_resources(SweepConfig(wait_for_autoscaler=True), _fixed({"CPU": 0}))


def test_the_concurrency_limit_is_enforced_by_the_search_algorithm():
    alg = search_algorithm(SweepConfig(num_samples=8), 3)
    assert alg.max_concurrent == 3




def test_sweep_config_is_validated():
    for bad, msg in [({"depths": (-1,)}, "--depths"), ({"lr_min": 0.0}, "--lr-min"), ({"num_samples": 0}, "--num-samples"),
                     ({"grace_epochs": 3, "max_epochs": 2}, "--grace-epochs"),
                     ({"gpus_per_worker": 0.5}, "whole number"), ({"gpus_per_worker": 1.5}, "whole number")]:
        with pytest.raises(ValueError, match=msg):
            SweepConfig(**bad)


# The sweep on a real (fake-autoscaling) cluster, killed and resumed: tests/test_autoscaling.py.


class _FakeResult:
    """What summarize reads from a Tune Result."""

    def __init__(self, trial, rows, lr, error=None):
        self.metrics = {"trial_id": trial}
        self.metrics_dataframe = pd.DataFrame(rows) if rows else None
        self.config = {"lr": lr, "unfrozen_depth": 1}
        self.error = error
        self.path = f"/x/_trial_{trial}"


def _epoch_folder(run, epoch, f1):
    d = run / f"epoch_{epoch:04d}"
    d.mkdir(parents=True)
    for n in ("model.pt", "labels.json", "val_predictions.csv", "val_probabilities.csv"):
        (d / n).write_text(n)
    (d / "meta.json").write_text(json.dumps({"epoch": epoch, "threshold": {"strategy": "global", "value": 0.5},
                                             "config": {"lr": 0.1}}))


def _row(epoch, f1):
    return {"epoch": epoch, "f1_samples": f1, "map": f1, "threshold_strategy": "global", "threshold_value": 0.5}


def test_the_summary_uses_the_checkpoints_ray_kept_with_ties_a_best_before_the_last_and_an_error(tmp_path,
                                                                                                 monkeypatch):
    """tie: epochs 1 and 2 tie; Ray kept epoch 2 (best and latest), epoch 1 is gone (the crash of issue 11).
    early: best epoch 1, last epoch 3; Ray kept both. broken: errored before any checkpoint."""
    from mlc.distributed import tune
    sweep_url = tmp_path / "sw"
    _epoch_folder(sweep_url / "tie", 2, 0.5)
    _epoch_folder(sweep_url / "early", 1, 0.4)
    _epoch_folder(sweep_url / "early", 3, 0.3)
    kept = {"tie": [(2, _row(2, 0.5))], "early": [(1, _row(1, 0.4)), (3, _row(3, 0.3))], "broken": []}
    monkeypatch.setattr(tune, "kept_by_trial", lambda grid, url: kept)
    predicted = {}
    monkeypatch.setattr("mlc.distributed.predict.predict",
                        lambda ckpt, *a, **k: predicted.update(ckpt=ckpt, **k) or {"rows": 0})
    monkeypatch.setattr("mlc.eval.plots.sweep_png", lambda table: b"\x89PNG")
    grid = [_FakeResult("tie", [_row(1, 0.5), _row(2, 0.5)], 0.01),
            _FakeResult("early", [_row(1, 0.4), _row(2, 0.35), _row(3, 0.3)], 0.001),
            _FakeResult("broken", [], 0.1, error=RuntimeError("worker died\ntraceback"))]
    sweep = SweepConfig(num_samples=3, max_epochs=3)
    out = tune.summarize(grid, cfg_stub(), sweep, str(sweep_url), None, 0.0, log=lambda *_: None, gpus_per_worker=0)
    table = out["table"].set_index("trial")
    assert table.loc["tie", "best_epoch"] == 2 and table.loc["early", "best_epoch"] == 1
    assert table.loc["broken", "status"] == "error" and math.isnan(table.loc["broken", "best_f1_samples"])
    assert table.loc["early", "status"] == "completed" and table.loc["tie", "status"] == "stopped early"
    assert out["best"]["trial"] == "tie" and out["best"]["epoch"] == 2
    assert json.loads((sweep_url / "best" / "meta.json").read_text())["epoch"] == 2
    assert predicted["ckpt"] == str(sweep_url / "best") and predicted["num_workers"] == 1
    assert list(pd.read_csv(sweep_url / "results.csv").trial) == ["tie", "early", "broken"]
    # The sweep's best_config.json is a --config for a full training run: the best trial's settings, flags on top.
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import train as train_job
    from mlc.cli import config_from_args
    args = train_job.get_args_parser().parse_args(["--config", str(sweep_url / "best_config.json"),
                                                   "--data", "/d", "--epochs", "12"])
    cfg = config_from_args(args)
    assert cfg.lr == 0.1 and cfg.epochs == 12 and cfg.data == "/d"


def cfg_stub():
    from mlc.config import TrainConfig
    return TrainConfig(data="/nowhere", batch_size=8)


def test_inputs_is_a_searched_choice_only_when_given_more_than_one():
    from ray.tune.search.sample import Categorical
    from mlc.config import SweepConfig
    from mlc.distributed.tune import search_space
    space = search_space(SweepConfig(inputs=("caption", "image+caption")))
    assert isinstance(space["inputs"], Categorical) and space["inputs"].categories == ["caption", "image+caption"]
    assert search_space(SweepConfig(inputs=("caption",)))["inputs"] == "caption"
    assert SweepConfig(inputs="image,caption").inputs == ("image", "caption")
    with pytest.raises(ValueError, match="--inputs must be values among"):
        SweepConfig(inputs=("text",))


def test_the_tune_job_takes_inputs_as_the_sweeps_choices():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import tune as tune_job
    base, sweep = tune_job.configs(tune_job.get_args_parser().parse_args(["--data", "/d", "--inputs",
                                                                         "image,image+caption"]))
    assert sweep.inputs == ("image", "image+caption") and base.inputs == "auto" and base.data == "/d"


def test_the_loss_and_its_parameters_are_searched_choices_when_given_several():
    from ray.tune.search.sample import Categorical
    from mlc.distributed.tune import search_space
    sweep = SweepConfig(loss="bce,asl", asl_gamma_neg="2,4", pos_weight=["none", "auto"])
    assert (sweep.loss, sweep.asl_gamma_neg, sweep.pos_weight) == (("bce", "asl"), (2.0, 4.0), ("none", "auto"))
    space = search_space(sweep)
    assert all(isinstance(space[k], Categorical) for k in ("loss", "asl_gamma_neg", "pos_weight"))
    assert space["loss"].categories == ["bce", "asl"] and space["asl_gamma_neg"].categories == [2.0, 4.0]
    fixed = search_space(SweepConfig())
    from mlc.config import TrainConfig
    train = TrainConfig()
    assert (fixed["loss"], fixed["asl_gamma_neg"], fixed["pos_weight"]) == (train.loss, train.asl_gamma_neg,
                                                                            train.pos_weight)  # train.py's
    for flags, message in ((dict(loss="hinge"), "--loss must be values among bce, asl, focal"),
                           (dict(asl_gamma_neg="2,-1"), "--asl-gamma-neg must be finite numbers >= 0"),
                           (dict(asl_gamma_neg="nan"), "--asl-gamma-neg must be finite numbers >= 0"),
                           (dict(asl_gamma_neg="x"), "--asl-gamma-neg must be comma-separated numbers"),
                           (dict(pos_weight="some"), "--pos-weight must be values among none, auto")):
        with pytest.raises(ValueError, match=message):
            SweepConfig(**flags)


def test_the_tune_job_takes_the_loss_settings_as_the_sweeps_choices():
    import sys
    from mlc.config import TrainConfig
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import tune as tune_job
    base, sweep = tune_job.configs(tune_job.get_args_parser().parse_args(
        ["--data", "/d", "--loss", "bce,asl", "--asl-gamma-neg", "1,4", "--pos-weight", "auto"]))
    assert sweep.loss == ("bce", "asl") and sweep.asl_gamma_neg == (1.0, 4.0) and sweep.pos_weight == ("auto",)
    assert base.loss == TrainConfig().loss  # the default: a trial takes its draw


def test_a_sweep_on_the_demo_set_fixes_the_demos_inputs_and_loss_unless_it_names_its_own():
    """The demo's captions are generated from its labels (a network reading them scores 1.0), and its loss is the
    one measured for image-only training from scratch: a demo sweep must not take the captioned-data defaults."""
    import sys
    from mlc.data.demo import DEMO_DEFAULTS
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import tune as tune_job
    parse = tune_job.get_args_parser().parse_args
    base, sweep = tune_job.configs(parse([]))
    assert base.data is None and (sweep.inputs, sweep.loss) == ((DEMO_DEFAULTS["inputs"],), (DEMO_DEFAULTS["loss"],))
    assert (sweep.inputs, sweep.loss) != (SweepConfig().inputs, SweepConfig().loss)
    _, sweep = tune_job.configs(parse(["--loss", "asl", "--inputs", "image,caption"]))
    assert (sweep.inputs, sweep.loss) == (("image", "caption"), ("asl",))
    _, sweep = tune_job.configs(parse(["--data", "/d"]))
    assert (sweep.inputs, sweep.loss) == (SweepConfig().inputs, SweepConfig().loss)
    assert "demo: bce)" in " ".join(tune_job.get_args_parser().format_help().split())


def test_an_unknown_model_stops_a_sweep_before_ray_starts(tmp_path):
    from mlc.config import TrainConfig
    from mlc.distributed.tune import run_sweep
    from mlc.errors import UsageError
    with pytest.raises(UsageError, match="--model convnext_nosuch"):
        run_sweep(TrainConfig(model="convnext_nosuch", output=str(tmp_path / "s")), SweepConfig(), log=print)
    assert not (tmp_path / "s").exists()
