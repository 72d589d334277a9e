"""Shared test fixtures. Real third-party assets live in ../shared/assets (see its README); tests that
need them skip with a clear message when the folder is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_ASSETS = Path(os.environ.get("SERIALGEN_SHARED_ASSETS", REPO.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def shared_assets() -> Path:
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"real test assets not found at {SHARED_ASSETS} (set SERIALGEN_SHARED_ASSETS)")
    return SHARED_ASSETS
