"""The suite's own helpers: what a flaky helper would break is every test that uses it."""

from __future__ import annotations

from ray_head import TEST_PORTS, ephemeral_ports, free_port


def test_free_ports_lie_outside_the_ephemeral_range_and_are_distinct():
    """A port a server is told to take must not be one the kernel can hand to another process's bind to
    port 0 in the meantime (a raylet's own gRPC server took a dashboard agent's port that way in CI)."""
    low, high = ephemeral_ports()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(p in TEST_PORTS and not low <= p <= high and p >= 20000 for p in ports), (min(ports), max(ports))


def test_the_suite_is_set_to_remove_a_passing_tests_folder_at_its_teardown(pytestconfig):
    """The end-to-end tests write ResNet-50 checkpoints, about 1 GB a test: kept for the whole session they
    came to 22 GB and filled a CI machine's disk."""
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
