"""Shared test fixtures. Real data sets live beside the project in ../shared/data (CI has them there too)."""

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"{SHARED_DATA} is missing: the tests read real data sets from ../shared/data"
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test models are tiny: threads gain nothing, and on a shared 2-core machine they spin-wait for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
