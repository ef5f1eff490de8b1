"""Typed configuration: plain YAML data checked against pydantic models.

Each stage owns a model here or in its module; :func:`load_config` validates a YAML file
against it (unknown keys are errors) and :func:`resolved` gives the plain dict that goes into
every output manifest.  Units are part of the key names.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cartiq.errors import ConfigError
from cartiq.io.labels import CONFIG_DIR

__all__ = ["Strict", "ThicknessConfig", "DefectConfig", "LesionConfig", "RegionConfig",
           "MeasureConfig", "load_config", "resolved", "config_hash"]

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ThicknessConfig(Strict):
    smoothing_sigma_mm: float = Field(0.35, ge=0, le=3,
        description="Gaussian smoothing of the masks before surface extraction")
    min_sigma_voxels: float = Field(0.5, ge=0, le=2,
        description="smoothing is at least this many voxels along each axis")
    mesh_smoothing_iterations: int = Field(30, ge=0, le=100,
        description="Taubin smoothing steps on the extracted surfaces")
    cover_fraction: float = Field(0.25, gt=0, lt=1,
        description="bone-surface point counts as covered where the interpolated cartilage "
                    "fraction reaches this value")
    crop_margin_mm: float = Field(6.0, ge=1, description="margin around each plate's bone ROI")
    thickness_method: Literal["nearest", "normal"] = Field("nearest",
        description="nearest: 3D distance from each covered bone-interface point to the "
                    "nearest articular-surface point; normal: along the bone surface normal")
    articular_max_angle_deg: float = Field(45.0, gt=0, le=90,
        description="articular surface: free cartilage surface whose normal is within this "
                    "angle of the facing bone's normal (side walls are not)")
    rim_exclusion_mm: float = Field(0.0, ge=0, le=3,
        description="covered points closer than this to the plate's outer cAB boundary get "
                    "no thickness (0: the mean runs over the whole cAB)")
    normal_smoothing_iterations: int = Field(5, ge=0, le=50,
        description="normal method: neighbour averaging of the bone-surface normals")
    ray_max_mm: float = Field(10.0, gt=0, le=30,
        description="normal method: rays not leaving the cartilage within this get no value")
    map_max_distance_mm: float = Field(12.0, gt=0,
        description="thickness map: cartilage voxels farther than this from any interface "
                    "point get no value")


class DefectConfig(Strict):
    partial_fraction: float = Field(0.5, gt=0, lt=1,
        description="partial-thickness defect: thickness below this fraction of expected")
    expected_radius_mm: float = Field(8.0, gt=0,
        description="neighbourhood radius for the expected local thickness")
    min_defect_area_mm2: float = Field(2.0, ge=0,
        description="smaller bare or thin patches are ignored (and bare ones count as covered)")
    max_hole_fraction: float = Field(0.5, gt=0, le=1,
        description="an enclosed bare patch larger than this fraction of the plate's covered "
                    "area is not a defect but a gap in the plate's extent")


class LesionConfig(Strict):
    min_lesion_volume_mm3: float = Field(5.0, ge=0)
    connectivity: Literal[6, 18, 26] = Field(26, description="voxel neighbourhood: 6, 18 or 26")


class RegionConfig(Strict):
    tibia_central_fraction: float = Field(0.2, gt=0, lt=1,
        description="share of each tibial plate's area in its central (ellipse) subregion")
    femur_central_anterior_fraction: float = Field(0.0, ge=-0.5, le=0.5,
        description="shift of the weight-bearing femur's anterior border, as a fraction of "
                    "the tibial plate's AP length (0 = tibial plate's anterior edge)")


class MeasureConfig(Strict):
    thickness: ThicknessConfig = ThicknessConfig()
    defects: DefectConfig = DefectConfig()
    lesions: LesionConfig = LesionConfig()
    regions: RegionConfig = RegionConfig()


def load_config(path: str | Path | None, model: type[M], *, default_name: str | None = None) -> M:
    """Validate YAML at ``path`` (or ``configs/<default_name>``, or the model defaults)."""
    if path is None and default_name is not None:
        path = CONFIG_DIR / default_name
    if path is None:
        return model()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError("config file does not exist", path) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config ({str(exc).splitlines()[0]})", path) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ConfigError(f"{where}: {err['msg']}", path) from None


def resolved(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")


def config_hash(config: BaseModel) -> str:
    text = json.dumps(resolved(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
