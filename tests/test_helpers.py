"""The suite's own helpers: what a flaky helper would break is every test that uses it."""

from __future__ import annotations

import socket
from pathlib import Path

from ray_head import TEST_PORTS, free_port


def test_free_ports_lie_below_the_ephemeral_range_are_distinct_and_bindable():
    """A port a server is told to take must not be one the kernel can hand to another process's bind to
    port 0 in the meantime (a raylet's own gRPC server took a dashboard agent's port that way in CI)."""
    range_file = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(range_file.read_text().split()[0]) if range_file.is_file() else 32768
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(p in TEST_PORTS and p < low for p in ports), (min(ports), max(ports), low)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))
