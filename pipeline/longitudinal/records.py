"""Registration records: the configuration, the per-bone result and its transform math.

World = LPS mm.  ``BoneRegistration.matrix`` (4x4) maps follow-up world points to baseline
world points; a SimpleITK rigid transform maps baseline points to follow-up points
(:func:`euler_to_matrix` gives its 4x4).  See :mod:`cartiq.longitudinal.register`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from cartiq.config import Strict

__all__ = ["BoneRegistration", "RegistrationConfig", "apply_matrix", "rotation_angle_deg",
           "registration_qc"]


class RegistrationConfig(Strict):
    crop_margin_mm: float = Field(15.0, ge=2, description="margin around each bone mask")
    fov_margin_mm: float = Field(3.0, ge=0,
        description="points this close to the image edge are left out (cut bone faces)")
    distance_clamp_mm: float = Field(20.0, gt=0, description="signed distances are clamped here")
    distance_smoothing_mm: float = Field(0.7, ge=0,
        description="Gaussian smoothing of the signed distance maps (removes voxel steps)")
    band_mm: float = Field(8.0, gt=0, description="metric band around the baseline bone surface")
    work_spacing_mm: float = Field(1.0, gt=0, le=4,
        description="the distance maps are registered on an isotropic grid of this spacing")
    iterations: int = Field(300, ge=10)
    metric_samples: int = Field(20000, ge=1000,
        description="random metric samples per iteration (inside the metric band)")
    intensity_refinement: bool = True
    intensity_band_mm: float = Field(4.0, gt=0)
    intensity_keep_tolerance_mm: float = Field(0.02, ge=0,
        description="intensity stage kept unless it worsens the residual by more than this")
    max_residual_mm: float = Field(2.0, gt=0,
        description="a registration with a larger residual has not converged")
    residual_limit_voxels: float = Field(1.0, gt=0, le=5,
        description="residual_flag is set above this many voxels along the bone-surface "
                    "normal (mean voxel extent along the normal, coarser visit): what two "
                    "segmentations of the same bone differ by at most")
    extra_start_deg: float = Field(15.0, ge=0, le=90,
        description="when the moment starts leave a residual above half a voxel, starts "
                    "rotated by +-this about each axis are tried too")
    max_points: int = Field(20000, ge=100, description="surface points used for residuals")
    seed: int = 7


@dataclass
class BoneRegistration:
    """Result of registering one bone (follow-up -> baseline)."""

    bone: str
    present: bool
    reason: str = ""
    matrix: np.ndarray = field(default_factory=lambda: np.eye(4))  # follow-up -> baseline
    converged: bool = False
    residual_mm: float = float("nan")
    residual_rms_mm: float = float("nan")
    residual_p95_mm: float = float("nan")
    residual_limit_mm: float = float("nan")
    residual_flag: bool = True
    dice: float = float("nan")
    volume_ratio: float = float("nan")
    stage: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    sitk_transform: Any = None  # SimpleITK Euler3DTransform, baseline -> follow-up

    def map_points(self, followup_points: np.ndarray) -> np.ndarray:
        """Follow-up world points (N, 3) to baseline world (N, 3)."""
        return apply_matrix(self.matrix, followup_points)

    def map_points_inverse(self, baseline_points: np.ndarray) -> np.ndarray:
        """Baseline world points (N, 3) to follow-up world (N, 3)."""
        return apply_matrix(np.linalg.inv(self.matrix), baseline_points)

    def to_json(self) -> dict[str, Any]:
        m = self.matrix
        out: dict[str, Any] = {"bone": self.bone, "present": self.present}
        if not self.present:
            out["reason"] = self.reason
            return out
        out.update({
            "converged": bool(self.converged),
            "reason": self.reason,
            "stage": self.stage,
            "matrix_followup_to_baseline_lps": np.round(m, 6).tolist(),
            "rotation_deg": round(rotation_angle_deg(m[:3, :3]), 3),
            "translation_mm": np.round(m[:3, 3], 3).tolist(),
            "residual_mean_mm": _r(self.residual_mm),
            "residual_rms_mm": _r(self.residual_rms_mm),
            "residual_p95_mm": _r(self.residual_p95_mm),
            "residual_limit_mm": _r(self.residual_limit_mm),
            "residual_flag": bool(self.residual_flag),
            "dice": _r(self.dice, 4),
            "volume_ratio": _r(self.volume_ratio, 4),
        })
        out.update(self.details)
        return out


def registration_qc(regs: dict[str, BoneRegistration], mismatch_reasons: list[str] = (),
                    error: str | None = None) -> dict[str, Any]:
    """QC block of a comparison's ``manifest.json``: status, flags, per-bone residuals.

    Flags (same fields as a scan's QC flags): ``registration_residual`` (warning: a bone's
    surface residual above its limit), ``registration_failed`` (error: not converged, its
    plates get no location-based values), ``bone_missing`` (warning), ``mismatch`` (error:
    not the same knee), ``compare_failed`` (error).  Status ``fail`` with any error,
    ``warn`` with any flag, else ``pass``.
    """
    flags: list[dict[str, Any]] = []

    def flag(code: str, severity: str, structure: str, message: str, value=None) -> None:
        flags.append({"code": code, "severity": severity, "structure": structure,
                      "message": message, "value": _r(value, 4) if value is not None else None})

    bones: dict[str, Any] = {}
    for b, r in regs.items():
        if not r.present:
            flag("bone_missing", "warning", b, r.reason)
            continue
        bones[b] = {"residual_mean_mm": _r(r.residual_mm), "residual_limit_mm":
                    _r(r.residual_limit_mm), "residual_flag": bool(r.residual_flag),
                    "dice": _r(r.dice, 4), "converged": bool(r.converged)}
        if not r.converged:
            flag("registration_failed", "error", b, r.reason or f"{b}: not registered",
                 r.residual_mm if np.isfinite(r.residual_mm) else None)
        elif r.residual_flag:
            flag("registration_residual", "warning", b,
                 f"{b}: bone-surface residual {r.residual_mm:.2f} mm > limit "
                 f"{r.residual_limit_mm:.2f} mm (one voxel along the surface normal): more than "
                 "two segmentations of one bone differ by; check the registration before "
                 "trusting location-based change", r.residual_mm)
    for reason in mismatch_reasons:
        flag("mismatch", "error", "registration", f"not the same knee? {reason}")
    if error:
        flag("compare_failed", "error", "compare", error)
    status = "fail" if any(f["severity"] == "error" for f in flags) else \
        "warn" if flags else "pass"
    return {"status": status, "n_flags": len(flags), "flags": flags, "bones": bones}


def _r(x: float, nd: int = 3) -> float | None:
    return None if not np.isfinite(x) else round(float(x), nd)


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.atleast_2d(np.asarray(points, dtype=float))
    return pts @ matrix[:3, :3].T + matrix[:3, 3]


def rotation_angle_deg(rot: np.ndarray) -> float:
    c = (np.trace(rot) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def euler_to_matrix(tx) -> np.ndarray:
    """4x4 of a SimpleITK rigid transform (maps baseline -> follow-up)."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(tx.GetMatrix()).reshape(3, 3)
    c = np.asarray(tx.GetCenter())
    a[:3, 3] = np.asarray(tx.GetTranslation()) + c - a[:3, :3] @ c
    return a
