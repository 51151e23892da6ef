"""A Ray head for tests: started with ``ray start --head --block`` and stopped by terminating that process.

``ray stop`` would kill every Ray process on the machine (other test sessions included), so the
head runs in the foreground of one child process whose SIGTERM handler stops exactly its own
processes. The dashboard (and with it the job server) listens on 127.0.0.1 only. Ray resolves
``--node-ip-address 127.0.0.1`` to the machine's address for its gRPC ports; we pass it anyway.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for binds to port 0 (Linux's default where it cannot be read)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# The ports tests hand to servers lie outside the kernel's ephemeral range, never come from a bind to port 0:
# a port taken that way is free again once its socket closes, and the kernel gave the same one to a raylet's
# own bind-to-0 gRPC server a second later (the dashboard agent then failed to bind its pinned port and the
# head died: "Address already in use", seen in CI). Ray's worker ports are 10002-19999, so they start above.
TEST_PORTS = [p for p in range(20000, 65536) if not ephemeral_ports()[0] <= p <= ephemeral_ports()[1]]
_given: set[int] = set()
_rng = random.Random(os.urandom(16))  # not the random module's state, which tests seed


def free_port() -> int:
    """A free port outside the ephemeral range, not handed out before in this process."""
    if not TEST_PORTS:
        raise RuntimeError(f"no port in 20000-65535 lies outside the ephemeral range {ephemeral_ports()} "
                           "(/proc/sys/net/ipv4/ip_local_port_range): narrow that range to run the Ray tests")
    for _ in range(1000):
        port = _rng.choice(TEST_PORTS)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError("no free port outside the ephemeral range after 1000 tries")


def own_ports() -> list[str]:
    """Ports Ray would otherwise take at fixed defaults (the dashboard agent's 52365, the client server's
    10001): free ones, so two test clusters on one machine (two pytest-xdist workers, or a developer's own
    Ray beside the suite) do not fight over them. A second agent that cannot bind its port leaves its node
    without a job agent ("No available agent to submit job")."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--ray-client-server-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}"]


# Ray Train's controller polls its workers every 2 s; each run waits out a poll or two to see its workers
# start, finish or fail. Polling every 0.5 s shortens every run of the suite (the worker-health timeouts that
# decide a failure are separate settings, left as they are).
FAST_TRAIN_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def node_ip() -> str:
    """The address Ray gives this node (it resolves 127.0.0.1 to it)."""
    from ray._private.services import get_node_ip_address
    return get_node_ip_address()


class RayHead:
    def __init__(self, num_cpus: int = 4, resources: str | None = None):
        self.port, self.dashboard_port = free_port(), free_port()
        self.dir = tempfile.mkdtemp(prefix="mlc-ray-")
        self.log = open(Path(self.dir) / "head.log", "w")
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
               f"--port={self.port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
               "--disable-usage-stats", "--include-dashboard=true", *own_ports()]
        # Ray 2.60 turns token auth on; the head writes the token to ~/.ray/auth_token if there is none.
        # RAY_ADDRESS pins the cluster's own processes to this cluster: Ray Train's placement-group cleaner
        # looks its controller up through the state API, which otherwise picks the newest Ray instance on
        # the machine, finds no controller there, and removes the live run's placement group.
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_ADDRESS=f"{node_ip()}:{self.port}", **FAST_TRAIN_POLL)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        self.address = None
        self._wait_ready()

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _wait_ready(self, timeout: float = 90.0) -> None:
        import urllib.request
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {self.read_log()[-3000:]}")
            text = self.read_log()
            if "Ray runtime started" in text:
                try:
                    urllib.request.urlopen(self.dashboard_url + "/api/version", timeout=2)
                except Exception as e:  # noqa: BLE001 - 401 (auth) also means it is up
                    if getattr(e, "code", None) is None:
                        time.sleep(0.5)
                        continue
                for line in text.splitlines():
                    if "ray start --address=" in line:
                        self.address = line.split("--address=")[1].split("'")[1]
                if self.address:
                    return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ray head not ready after {timeout}s: {self.read_log()[-3000:]}")

    def read_log(self) -> str:
        self.log.flush()
        return (Path(self.dir) / "head.log").read_text(errors="replace")

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL to the head's whole session: every process of this cluster and no other.

        ``ray start --block`` answers SIGTERM by stopping its processes one by one with their own grace
        periods, about 30 s on this machine; a test cluster has nothing worth a graceful stop after a few
        seconds, so the rest are killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


class IsolatedError(RuntimeError):
    """An exception raised in an isolated child: its type name, message and traceback."""


def _child(queue, fn, args, kwargs) -> None:
    import traceback
    try:
        queue.put(("ok", fn(*args, **kwargs)))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the test
        queue.put(("err", f"{type(e).__name__}: {e}", traceback.format_exc()))


def isolated(fn, *args, timeout: float = 600, **kwargs):
    """Run ``fn(*args, **kwargs)`` in a fresh (spawned) Python process and return its result.

    Tests never make the pytest process a Ray driver: Ray ends a process whose background threads
    touch Ray after ``ray.shutdown()`` ("The core worker has already been shutdown ... The process
    will exit"), which killed a whole test session once. ``fn`` must be a module-level function.
    """
    import multiprocessing as mp
    import queue as queue_mod
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, fn, args, kwargs))
    p.start()
    try:
        result = q.get(timeout=timeout)
    except queue_mod.Empty:
        raise IsolatedError(f"{getattr(fn, '__name__', fn)} gave no result in {timeout} s "
                            f"(exit code {p.exitcode})") from None
    finally:
        p.join(60)
        if p.is_alive():
            p.kill()
            p.join()
    if result[0] == "err":
        raise IsolatedError(f"{result[1]}\n{result[2]}")
    return result[1]


# The fake multi-node provider's base config. Ray's wheel does not ship
# ray/autoscaler/_private/fake_multi_node/example.yaml, which AutoscalingCluster._generate_config reads.
FAKE_BASE = {
    "cluster_name": "mlc-fake", "max_workers": 8,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 1.0,
    "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [],
}


def _autoscaling_cluster_class():
    from ray.cluster_utils import AutoscalingCluster

    class Generated(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            import copy
            config = copy.deepcopy(FAKE_BASE)
            config["available_node_types"] = dict(worker_node_types)
            config["available_node_types"]["ray.head.default"] = {"resources": head_resources, "node_config": {},
                                                                  "max_workers": 0}
            config.update(config_kwargs)
            return config

    return Generated


class AutoscalingHead(RayHead):
    """Ray's fake multi-node autoscaler on this machine, as a scale-from-zero cluster: a head with 0 CPUs and
    worker node types the autoscaler adds on demand (``ray.cluster_utils.AutoscalingCluster``'s config).

    AutoscalingCluster.start() and shutdown() run ``ray stop --force``, which would kill every Ray on the
    machine: the head is started here instead like ``RayHead`` (``ray start --head --block`` in its own
    session, loopback dashboard), and stopped by signalling that session only: the fake worker nodes are
    processes the head's monitor started, in the same session. The config file is also what the job
    drivers read as the autoscaler's node types (``MLC_AUTOSCALER_CONFIG``, as ``~/ray_bootstrap_config.yaml``
    on a ``ray up`` head). The worker nodes the monitor started are in the head's session, so ``stop`` ends
    them too.
    """

    def __init__(self, worker_node_types: dict, head_resources: dict | None = None, idle_timeout_minutes=1.0):
        import json
        self.port, self.dashboard_port = free_port(), free_port()
        self.dir = tempfile.mkdtemp(prefix="mlc-ray-auto-")
        ip = node_ip()
        generated = _autoscaling_cluster_class()(dict(head_resources or {"CPU": 0}), worker_node_types,
                                                 idle_timeout_minutes=idle_timeout_minutes)
        self.config = generated._config
        self.config["provider"]["gcs_address"] = f"{ip}:{self.port}"  # the provider assumes port 6379
        self.config_path = str(Path(self.dir) / "autoscaling.yaml")
        Path(self.config_path).write_text(json.dumps(self.config))
        self.log = open(Path(self.dir) / "head.log", "w")
        head = self.config["available_node_types"]["ray.head.default"]["resources"]
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
               f"--port={self.port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--num-cpus={head.get('CPU', 0)}",
               f"--num-gpus={head.get('GPU', 0)}", f"--autoscaling-config={self.config_path}",
               "--disable-usage-stats", "--include-dashboard=true", *own_ports()]
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_ADDRESS=f"{ip}:{self.port}",
                        AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1",
                        MLC_AUTOSCALER_CONFIG=self.config_path, **FAST_TRAIN_POLL)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        self.address = None
        self._wait_ready()

