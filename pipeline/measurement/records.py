"""The records of one measured scan, passed from measurement to scoring, comparison, QC
and reports: each plate's tAB surface with per-vertex values, defects, lesions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cartiq.io.volume import Geometry

__all__ = ["PlateResult", "Defect", "Lesion", "MeasureResult"]


@dataclass
class PlateResult:
    """One cartilage plate: its subchondral surface patch (tAB) with per-point values."""

    name: str
    bone: str
    present: bool
    volume_mm3: float = 0.0
    points_world: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    faces: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))
    thickness_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    expected_thickness_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    covered: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    denuded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    vertex_area_mm2: np.ndarray = field(default_factory=lambda: np.zeros(0))
    region: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    defect_id: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    region_volume_mm3: dict[str, float] = field(default_factory=dict)


@dataclass
class Defect:
    id: int
    plate: str
    region: str
    kind: str  # "full" | "partial"
    area_mm2: float
    depth_pct: float
    centroid_world: np.ndarray


@dataclass
class Lesion:
    id: int
    bone: str
    region: str
    volume_mm3: float
    max_slice_area_mm2: float
    max_diameter_mm: float
    centroid_world: np.ndarray
    mask_index: np.ndarray  # (K, 3) voxel indices


@dataclass
class MeasureResult:
    side: str | None
    geometry: Geometry
    plates: dict[str, PlateResult]
    defects: list[Defect]
    lesions: list[Lesion]
    rows: list[dict[str, Any]]
    thickness_map: np.ndarray
    warnings: list[str] = field(default_factory=list)
    #: :func:`cartiq.io.labels.plate_boxes` of the measured label map (QC and its figure
    #: reuse them instead of scanning the volume again)
    plate_boxes: dict[str, tuple[slice, ...] | None] | None = None
