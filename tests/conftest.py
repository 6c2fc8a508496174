"""Shared fixtures. Real-data tests skip where ../shared/data is absent, but fail under CI=true."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SHARED_DATA} is missing, and CI=true requires the real data samples")
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    return SHARED_DATA
