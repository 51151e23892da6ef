"""What a Ray cluster is and can become: node types, per-worker resources, how many workers fit, waiting for nodes.

The clusters the project ships scale from zero: a head with 0 CPUs and worker nodes that the autoscaler adds
when work asks for them. What is up *now* says nothing about what the cluster can hold, so plans are made
from the autoscaler's node types, read (in this order) from:

1. the cluster config that autoscaler v2 reports to the GCS (``ray._private.state.state.get_cluster_config``);
2. the autoscaling config file: ``$MLC_AUTOSCALER_CONFIG``, else ``~/ray_bootstrap_config.yaml``, which
   ``ray up`` writes on the head node, where ``ray job submit`` runs the job drivers;
3. ``$MLC_NODE_TYPES``: the same ``available_node_types`` mapping as JSON, for clusters whose autoscaler
   keeps its config elsewhere (KubeRay's v1 autoscaler reads the RayCluster resource; the shipped
   manifests set it on the head, beside the worker groups it describes).

When none is found only the nodes that are up count, and a run that does not fit them fails at once unless ``--wait-for-autoscaler`` says an
autoscaler this process cannot see will add nodes. Then GPUs are not guessed: ``--gpus-per-worker`` must
be given.

Nothing here touches CUDA: the driver may run on a head node with or without a GPU, and the device is the
workers' business.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

# --cpus-per-worker auto for GPU workers: this many CPUs per GPU (loader processes decoding JPEGs for one
# ResNet50 GPU), capped by what the GPU node type has per GPU. CPU workers get 1.
CPUS_PER_GPU = 8


class ClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict      # one node's Ray resources
    max_count: int       # nodes of this type the cluster may have


@dataclass(frozen=True)
class Cluster:
    """A snapshot: the nodes alive now and, when known, the node types the autoscaler may add."""
    alive: tuple          # one resources dict per alive node
    types: tuple | None   # NodeType, or None when no autoscaler config could be read
    source: str           # where the node types came from, for messages

    def shapes(self) -> list:
        return [t.resources for t in self.types or ()] + list(self.alive)


def fits(node: dict, per_worker: dict) -> int:
    """Workers of ``per_worker`` that one node with ``node`` resources holds."""
    needs = [(k, v) for k, v in per_worker.items() if v > 0]
    if not needs:
        return 1 << 30
    return int(min(math.floor(node.get(k, 0) / v + 1e-9) for k, v in needs))


def capacity_now(cluster: Cluster, per_worker: dict) -> int:
    return sum(fits(n, per_worker) for n in cluster.alive)


def capacity_max(cluster: Cluster, per_worker: dict) -> int:
    """Workers the cluster can hold once the autoscaler has added every node it may (the nodes up now when
    there is no autoscaler config)."""
    now = capacity_now(cluster, per_worker)
    if cluster.types is None:
        return now
    return max(now, sum(fits(t.resources, per_worker) * t.max_count for t in cluster.types))


def types_from_config(config: dict) -> tuple:
    """NodeTypes of a Ray cluster launcher config (``available_node_types``)."""
    head = config.get("head_node_type")
    total = config.get("max_workers")
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        res = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if name == head:
            count = 1
        else:
            count = int(spec.get("max_workers", total if total is not None else 0))
            if total is not None:
                count = min(count, int(total))  # the cluster-wide cap binds every type
        out.append(NodeType(name, res, count))
    return tuple(out)


def _types_from_gcs() -> tuple | None:
    try:
        import ray._private.state as state
        cc = state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS, or no cluster config: try the next source
        return None
    if cc is None or not cc.node_group_configs:
        return None
    out = []
    for g in cc.node_group_configs:
        count = g.max_count if g.max_count >= 0 else 1 << 20
        out.append(NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, count))
    return tuple(out)


def _types_from_file() -> tuple[tuple | None, str]:
    path = os.environ.get("MLC_AUTOSCALER_CONFIG") or os.path.expanduser("~/ray_bootstrap_config.yaml")
    if not os.path.isfile(path):
        return None, path
    import yaml
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except Exception as e:  # noqa: BLE001
        raise ClusterError(f"{path}: cannot read the autoscaling config ({e}); fix it or unset "
                           "MLC_AUTOSCALER_CONFIG") from e
    if not isinstance(config, dict) or "available_node_types" not in config:
        raise ClusterError(f"{path}: not a Ray cluster config (no available_node_types)")
    return types_from_config(config), path


def describe() -> Cluster:
    """The cluster this process is connected to (``ray.init`` done)."""
    import ray
    alive = tuple(dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive"))
    types = _types_from_gcs()
    if types is not None:
        return Cluster(alive, types, "the autoscaler's cluster config (GCS)")
    types, path = _types_from_file()
    if types is not None:
        return Cluster(alive, types, f"the autoscaling config {path}")
    types = _types_from_env()
    if types is not None:
        return Cluster(alive, types, "the node types in $MLC_NODE_TYPES")
    return Cluster(alive, None, "the nodes up now (no autoscaler config found)")


def _types_from_env() -> tuple | None:
    text = os.environ.get("MLC_NODE_TYPES")
    if not text:
        return None
    import json
    try:
        mapping = json.loads(text)
        if not isinstance(mapping, dict):
            raise ValueError("not a JSON object")
        return types_from_config({"available_node_types": mapping})
    except (ValueError, TypeError, AttributeError) as e:
        raise ClusterError(f"$MLC_NODE_TYPES: expected a JSON object of node types, e.g. "
                           f"'{{\"gpu\": {{\"resources\": {{\"CPU\": 7, \"GPU\": 1}}, \"max_workers\": 4}}}}' ({e})") from e


def default_gpus(shapes) -> float:
    """GPUs per worker when none were asked for: one when any of ``shapes`` (node types, or resources of
    the nodes up) has a GPU, else none (CPU workers)."""
    return 1.0 if any(s.get("GPU", 0) > 0 for s in shapes) else 0.0


def choose_resources(cluster: Cluster, gpus: float | None, cpus: float | None, *, wait: bool) -> dict:
    """Per-worker resources for training: GPUs and CPUs resolved from the node types the cluster can provide.

    ``gpus`` None: 1 if any node type (or alive node) has a GPU, else 0. Never 0 merely because no GPU node
    is up yet: without node types and without GPU nodes up, a run that waits for an autoscaler must say.
    ``cpus`` None: GPU workers get CPUS_PER_GPU per GPU, capped by the CPUs per GPU of the GPU node types;
    CPU workers 1.
    """
    shapes = cluster.shapes()
    if gpus is None:
        if default_gpus(shapes):
            gpus = 1.0
        elif cluster.types is None and wait:
            raise ClusterError(
                "cannot tell whether this cluster will have GPUs: no autoscaler config was found (looked in "
                "the GCS, $MLC_AUTOSCALER_CONFIG / ~/ray_bootstrap_config.yaml and $MLC_NODE_TYPES) and no GPU "
                "node is up; pass --gpus-per-worker 1 for GPU workers or 0 for CPU workers")
        else:
            gpus = 0.0
    if cpus is None:
        if gpus > 0:
            per_gpu = [s.get("CPU", 0) / math.floor(s["GPU"] / gpus) for s in shapes
                       if s.get("GPU", 0) >= gpus and s.get("CPU", 0) >= 1]
            cap = math.floor(min(per_gpu)) if per_gpu else 1
            cpus = float(max(1, min(CPUS_PER_GPU * gpus, cap)))
        else:
            cpus = 1.0
    return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}


def check_feasible(cluster: Cluster, per_worker: dict, needed: int, *, what: str, wait: bool) -> None:
    """Fail at once, clearly, when ``needed`` workers can never fit; otherwise return (maybe to wait)."""
    if cluster.types is None and wait:
        return  # an autoscaler we cannot see may add nodes: wait (with a deadline) instead
    most = capacity_max(cluster, per_worker)
    if most >= needed:
        return
    if cluster.types is not None:
        listed = ", ".join(f"{t.name} {fmt_resources(t.resources)} x{t.max_count}" for t in cluster.types)
        where = f"the node types of {cluster.source} ({listed})"
        hint = "or give the cluster a node type (or max_workers) that holds them"
    else:
        listed = ", ".join(fmt_resources(n) for n in cluster.alive) or "none"
        where = f"the nodes up now ({listed}); no autoscaler config was found"
        hint = "add nodes, or pass --wait-for-autoscaler if an autoscaler this process cannot see will add them"
    raise ClusterError(
        f"{what} needs {needed} worker(s) of {fmt_resources(per_worker)}, but at most {most} ever fit on {where}: "
        f"lower the worker count or --cpus-per-worker / --gpus-per-worker, {hint}")


def wait_for_workers(per_worker: dict, needed: int, *, timeout_s: float, log=print, what: str = "the run",
                     poll_s: float = 2.0, say_every_s: float = 30.0) -> int:
    """Block until ``needed`` workers of ``per_worker`` fit on alive nodes; returns how many fit.

    Asks the autoscaler for the nodes (``request_resources``) while waiting, and withdraws the request
    once they are up (or on giving up): the run's own placement groups then hold them, and a standing
    request would keep nodes alive after the run. A driver killed (SIGKILL) during the wait cannot
    withdraw it; the next run's wait replaces it, or ``ray.autoscaler.sdk.request_resources(bundles=[])``.
    """
    from ray.autoscaler.sdk import request_resources
    cluster = describe()
    have = capacity_now(cluster, per_worker)
    if have >= needed:
        return have
    deadline = time.monotonic() + timeout_s
    request_resources(bundles=[dict(per_worker)] * needed)
    said = -math.inf
    try:
        while True:
            cluster = describe()
            have = capacity_now(cluster, per_worker)
            if have >= needed:
                log(f"{what}: the cluster now holds {have} worker(s) of {fmt_resources(per_worker)}")
                return have
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterError(
                    f"{what}: gave up after {timeout_s:.0f} s waiting for nodes: {needed} worker(s) of "
                    f"{fmt_resources(per_worker)} needed, {have} fit on the nodes up now. Check the autoscaler "
                    "(`ray status`, the monitor log) for quota or Spot capacity errors, or raise "
                    "--wait-timeout")
            if time.monotonic() - said >= say_every_s:
                log(f"{what}: waiting for {nodes_needed(cluster, per_worker, needed - have)} from the "
                    f"autoscaler ({have}/{needed} worker(s) of {fmt_resources(per_worker)} fit now); giving up in "
                    f"{left:.0f} s")
                said = time.monotonic()
            time.sleep(poll_s)
    finally:
        request_resources(bundles=[])


def nodes_needed(cluster: Cluster, per_worker: dict, missing: int) -> str:
    """'N nodes of type T' for the smallest node type that holds a worker, or 'nodes' when unknown."""
    best = None
    for t in cluster.types or ():
        k = fits(t.resources, per_worker)
        if 0 < k < (1 << 30) and (best is None or k < best[1]):
            best = (t.name, k)
    if best is None:
        return "more nodes"
    n = math.ceil(missing / best[1])
    return f"{n} node{'s' if n != 1 else ''} of type {best[0]}"


def fmt_resources(r: dict) -> str:
    shown = {k: v for k, v in r.items() if k in ("CPU", "GPU") or not (k.startswith("node:") or k in (
        "memory", "object_store_memory"))}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def ensure_ray(log=print) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray, unless this process is already connected."""
    import ray
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # "local" always starts a new Ray here: a bare ray.init() would join any cluster `ray start` left on this
    # machine (it reads /tmp/ray/ray_current_cluster), whoever started it.
    runtime_env = None
    if not address:
        # Workers import mlc; from a checkout that is not pip-installed (the jobs put the checkout on
        # sys.path) they find it through PYTHONPATH. Under `ray job submit --working-dir .` Ray does this.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        runtime_env = {"env_vars": {"PYTHONPATH": path}}
    ray.init(address=address or "local", log_to_driver=True, runtime_env=runtime_env)
    log(f"ray: joined the cluster at {address}" if address else "ray: no RAY_ADDRESS, started a local Ray")
