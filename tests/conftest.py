"""Shared fixtures: a clean logging/env state per test and the public-sample mirror."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """Tests never depend on a developer's cartiq environment variables."""
    for key in list(os.environ):
        if key.startswith("CARTIQ_") and key != "CARTIQ_DATA_MIRROR":
            monkeypatch.delenv(key, raising=False)
    yield
    logger = logging.getLogger("cartiq")
    for h in list(logger.handlers):
        logger.removeHandler(h)


@pytest.fixture(scope="session")
def data_mirror() -> Path:
    """Local mirror of the public samples (CI: ../shared/data); skip when absent."""
    env = os.environ.get("CARTIQ_DATA_MIRROR")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if candidate.is_dir():
            return candidate
    pytest.skip("no local mirror of the public sample data")
