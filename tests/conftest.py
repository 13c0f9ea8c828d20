"""Shared test fixtures. Real data sets live beside the project in ../shared/data (CI has them there too)."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"{SHARED_DATA} is missing: the tests read real data sets from ../shared/data"
    return SHARED_DATA
