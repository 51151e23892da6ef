"""mlc.distributed.cluster without a cluster: node types from configs, per-worker resources, the wait and its deadline."""

from __future__ import annotations

import pytest

from mlc.distributed import cluster
from mlc.distributed.cluster import Cluster, ClusterError, NodeType

pytest.importorskip("ray")


def test_node_types_from_a_launcher_config_respect_the_global_cap():
    types = cluster.types_from_config({
        "max_workers": 3, "head_node_type": "head",
        "available_node_types": {"head": {"resources": {"CPU": 0}}, "gpu": {"resources": {"CPU": 12, "GPU": 2},
                                                                             "max_workers": 8}}})
    assert types == (NodeType("head", {"CPU": 0.0}, 1), NodeType("gpu", {"CPU": 12.0, "GPU": 2.0}, 3))
    c = Cluster(({"CPU": 0},), types, "test")
    # 2 GPUs and 12 CPUs per node: 6 CPUs per GPU worker (below the 8-per-GPU rule), 6 workers at most.
    per_worker = cluster.choose_resources(c, None, None, wait=False)
    assert per_worker == {"CPU": 6.0, "GPU": 1.0}
    assert cluster.capacity_now(c, per_worker) == 0 and cluster.capacity_max(c, per_worker) == 6
    # CPU-only clusters get CPU workers with 1 CPU each; explicit values are kept.
    cpu = Cluster(({"CPU": 4},), None, "test")
    assert cluster.choose_resources(cpu, None, None, wait=False) == {"CPU": 1.0}
    assert cluster.choose_resources(cpu, 0, 3, wait=False) == {"CPU": 3.0}


def test_waiting_asks_the_autoscaler_says_so_and_gives_up_at_the_deadline(monkeypatch):
    import ray.autoscaler.sdk
    requests, logs = [], []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: requests.append(list(bundles)))
    zero = Cluster(({"CPU": 0},), (NodeType("gpu", {"CPU": 8, "GPU": 1}, 4),), "test")
    monkeypatch.setattr(cluster, "describe", lambda: zero)
    per_worker = {"CPU": 8.0, "GPU": 1.0}
    with pytest.raises(ClusterError, match="gave up after 0 s.*2 worker"):
        cluster.wait_for_workers(per_worker, 2, timeout_s=0.2, log=logs.append, what="run r1", poll_s=0.01)
    assert "run r1: waiting for 2 nodes of type gpu" in logs[0]
    assert requests[0] == [per_worker, per_worker] and requests[-1] == []  # asked, then withdrawn

    # Nodes arrive: the wait ends, and the request is withdrawn.
    up = Cluster(({"CPU": 0}, {"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}), zero.types, "test")
    states = iter([zero, zero, up])
    monkeypatch.setattr(cluster, "describe", lambda: next(states))
    requests.clear()
    assert cluster.wait_for_workers(per_worker, 2, timeout_s=30, log=logs.append, poll_s=0.01) == 2
    assert requests[-1] == []
