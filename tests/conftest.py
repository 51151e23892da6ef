"""Shared fixtures. The real COMP5329 data lives beside the repo in ../shared/data/comp5329."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "comp5329"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ray_head.py
# Ray 2.60 clusters use token auth, and a client presents its token (~/.ray/auth_token) only in token
# mode, which Ray reads once at import: set it before any test imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# No usage reporting from tests. It also keeps Ray Data's usage poller thread from starting in this
# process: that thread outlives ray.shutdown(), and its next poll makes Ray end the whole process
# ("The core worker has already been shutdown ... The process will exit"), pytest included.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# `ray start` in token mode needs a token and, unlike ray.init(), never makes one. On a fresh machine
# (CI) there is none in ~/.ray/auth_token: give this session's clusters, jobs and clients a token of
# their own in the environment, which every process the tests start inherits, rather than writing one
# into the user's home.
if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").is_file()):
    import secrets
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real dataset folder (train.csv, test.csv, images/, variant_2021_excel_resaved/); skips if absent."""
    missing = [p for p in ("train.csv", "test.csv") if not (REAL_DATA / p).is_file()]
    if missing:
        pytest.skip(f"real COMP5329 data not found: {', '.join(str(REAL_DATA / p) for p in missing)} "
                    "(expected in ../shared/data/comp5329 beside the repo)")
    return REAL_DATA


@pytest.fixture(scope="session")
def real_train(real_data):
    """read_table of the real train.csv, parsed once per session (do not mutate)."""
    from mlc.data.table import read_table
    return read_table(str(real_data / "train.csv"))


@pytest.fixture(scope="session")
def real_test(real_data):
    """read_table of the real test.csv, parsed once per session (do not mutate)."""
    from mlc.data.table import read_table
    return read_table(str(real_data / "test.csv"))


@pytest.fixture(scope="session")
def ray_head():
    """One Ray head (4 CPUs, token auth, dashboard on 127.0.0.1) for the session, stopped at the end."""
    pytest.importorskip("ray")
    from ray_head import RayHead
    head = RayHead(num_cpus=4)
    yield head
    head.stop()


# --- A GCS JSON API server (gcp-storage-emulator behind tests/gcs_server.py's proxy) ---------------------------


@pytest.fixture(scope="session")
def gcs_server():
    """The emulator behind a proxy for the whole session; this process and the processes it starts from now
    on (subprocesses, DataLoader workers) reach gs:// there, anonymously. See tests/gcs_server.py."""
    pytest.importorskip("gcp_storage_emulator", reason="needs the dev extra: pip install -e '.[dev]'")
    from gcs_server import GCS
    server = GCS()
    server.activate()
    yield server
    server.stop()


@pytest.fixture
def gcs(gcs_server, tmp_path, monkeypatch):
    """A fresh bucket (``gcs.url("a/b")`` is ``gs://<bucket>/a/b``; ``gcs.upload(folder, url)``), the proxy with no
    faults, no latency and an empty request log (``gcs.proxy.add_fault(503, "GET", r"o/x", times=1)``,
    ``gcs.proxy.count("GET", ...)``), and a byte cache private to the test (MLC_BYTE_CACHE)."""
    monkeypatch.setenv("MLC_BYTE_CACHE", str(tmp_path / "byte-cache"))
    gcs_server.proxy.reset()
    gcs_server.new_bucket()
    yield gcs_server
    gcs_server.proxy.reset()
    gcs_server.empty_bucket()
