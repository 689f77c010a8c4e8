"""Shared test helpers.

The real datasets live outside the project, at ``../shared/data`` from the project root
(see that folder's README): they are never committed here. Tests that need them skip,
saying why, where the folder is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(name: str | None = None) -> Path:
    """``../shared/data`` (or one dataset folder in it); skips the calling test if it is absent."""
    path = SHARED_DATA if name is None else SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (see shared/data/README.md); not part of the repo")
    return path


@pytest.fixture(name="shared_data")
def shared_data_fixture() -> Path:
    """The ``../shared/data`` folder; skips the test when it is absent."""
    return shared_data()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (the machine is shared; tiny models gain nothing from two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
