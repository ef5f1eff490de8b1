"""Data shipped with cartiq: configs, label mappings, model packages, the sample registry.

In the source tree these live at the top level (``configs/``, ``models/``,
``sample_data/``); the build maps them into this namespace package ``cartiq.resources`` so that an installed wheel carries them;
:func:`resource_dir` finds them through the import system either way (wheel, editable install or source checkout).
"""

from __future__ import annotations

import importlib
from pathlib import Path

__all__ = ["resource_dir", "CONFIGS", "MODELS", "SAMPLE_DATA"]

CONFIGS, MODELS, SAMPLE_DATA = "configs", "models", "sample_data"


def resource_dir(name: str) -> Path:
    """Folder of shipped resource ``name`` (``configs``, ``models`` or ``sample_data``)."""
    if name not in (CONFIGS, MODELS, SAMPLE_DATA):
        raise ValueError(f"unknown resource folder {name!r}")
    try:  # an installed wheel: cartiq/resources/<name>
        module = importlib.import_module(f"cartiq.resources.{name}")
        return Path(next(iter(module.__path__)))
    except ModuleNotFoundError:  # an editable install or a source checkout: <repo>/<name>
        return Path(__file__).resolve().parent.parent / name
