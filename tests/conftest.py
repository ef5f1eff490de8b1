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


# the four real manual label maps of ../shared/data/labels: (file, label mapping, side)
REAL_LABEL_MAPS = [("pymskt_dess_right_label.nrrd", "pymskt_dess", "right"),
                   ("mskt_right_knee_example_label.nrrd", "pymskt_dess", "right"),
                   ("mskt_t2_left_knee_label.nrrd", "pymskt_dess", "left"),
                   ("spl_knee_atlas_labels.nrrd", "spl_knee_atlas", "left")]


@pytest.fixture(scope="session", params=REAL_LABEL_MAPS, ids=[m[0].split(".")[0] for m in REAL_LABEL_MAPS])
def real_label_map(request, data_mirror):
    """One real label map in the cartiq scheme: (labels array, geometry, side)."""
    from cartiq.io.labels import load_mapping, to_default_scheme
    from cartiq.io.volume import read_volume

    name, mapping, side = request.param
    path = data_mirror / "labels" / name
    if not path.is_file():
        pytest.skip(f"{name} not in the data mirror")
    vol = read_volume(path, kind="labels")
    lab, _ = to_default_scheme(vol.array, load_mapping(mapping), vol.geometry.affine, side=side)
    return lab, vol.geometry, side
