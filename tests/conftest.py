"""Shared fixtures. The real COMP5329 data lives beside the repo in ../shared/data/comp5329."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "comp5329"


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
    from mlc.table import read_table
    return read_table(str(real_data / "train.csv"))


@pytest.fixture(scope="session")
def real_test(real_data):
    """read_table of the real test.csv, parsed once per session (do not mutate)."""
    from mlc.table import read_table
    return read_table(str(real_data / "test.csv"))
