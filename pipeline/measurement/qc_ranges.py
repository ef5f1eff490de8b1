"""Plausible adult ranges: the QC checks that make a broken segmentation ``fail``.

A segmentation that puts a plate's volume or mean thickness outside a plausible adult range,
labels an implausibly large bone-marrow lesion, or sits mostly on the image border is not a
measurement to trust: :mod:`cartiq.measurement.qc` turns each of these into an error-level
flag, so the scan's QC status is ``fail`` (numbers still written, marked ``qc_status``).

The ranges are deliberately wide - they must never fail a real adult knee, healthy or
osteoarthritic - and are set in ``configs/qc.yaml`` (section ``plausible``), where their
sources are cited:

* Eckstein F, Winzheimer M, Hohe J, Englmeier KH, Reiser M. Interindividual variability and
  correlation among morphological parameters of knee joint cartilage plates: analysis with
  three-dimensional MR imaging. Osteoarthritis Cartilage 2001;9(2):101-111 (27 healthy men:
  total knee cartilage 16.6-31.4 ml, mean thickness per knee 1.57-2.43 mm, patella mean
  2.76 mm and maximum 5.72 mm);
* Cicuttini F, Forbes A, Morris K, Darling S, Bailey M, Stuckey S. Gender differences in knee
  cartilage volume as measured by magnetic resonance imaging. Osteoarthritis Cartilage
  1999;7(3):265-271 (men's femoral cartilage 4.1 ml and patellar 1.4 ml larger than women's);
* the four real manual label maps in the project's sample data (femoral cartilage
  11,846-14,663 mm3, medial tibial 1,917-2,742, lateral tibial 1,848-4,056, patellar
  1,178-3,884 mm3).

Per-plate limits are cartiq's choices widened from these sources, not published cut-offs;
the BML limits in particular are uncertain (no labelled BML data here).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from cartiq.config import Strict
from cartiq.io.volume import Geometry

__all__ = ["PlausibleRanges", "range_problems", "typical_volume_problem", "bml_problems",
           "border_fraction"]


def _volumes() -> dict[str, tuple[float, float]]:
    return {"femoral_cartilage": (3000.0, 18000.0), "medial_tibial_cartilage": (300.0, 4500.0),
            "lateral_tibial_cartilage": (400.0, 5500.0), "patellar_cartilage": (400.0, 6000.0)}


def _thickness() -> dict[str, tuple[float, float]]:
    return {"femoral_cartilage": (1.0, 3.5), "medial_tibial_cartilage": (0.8, 3.5),
            "lateral_tibial_cartilage": (1.0, 4.0), "patellar_cartilage": (1.0, 4.5)}


class PlausibleRanges(Strict):
    """Limits beyond which a segmentation is broken (error-level QC flags)."""

    plate_volume_mm3: dict[str, tuple[float, float]] = Field(default_factory=_volumes)
    mean_thickness_mm: dict[str, tuple[float, float]] = Field(default_factory=_thickness)
    max_bml_volume_mm3: float = Field(10000.0, gt=0, description="all BMLs together")
    max_bml_bone_fraction: float = Field(0.15, gt=0, le=1,
                                         description="BML share of a bone's labelled marrow")
    max_far_fraction: float = Field(0.25, ge=0, le=1, description="share of a plate farther "
                                    "than max_distance_to_bone_mm from its bone")
    border_margin_mm: float = Field(3.0, ge=0)
    max_border_fraction: float = Field(0.5, ge=0, le=1, description="share of a plate "
                                       "within border_margin_mm of the image border")


def range_problems(name: str, volume_mm3: float, mean_thickness_mm: float | None,
                   ranges: PlausibleRanges) -> list[tuple[str, str, float]]:
    """(code, message, value) for a plate volume or mean thickness outside its range."""
    out = []
    lo, hi = ranges.plate_volume_mm3.get(name, (0.0, np.inf))
    if not lo <= volume_mm3 <= hi:
        out.append(("plate_volume", f"{name} volume {volume_mm3:.0f} mm3 outside the plausible "
                    f"adult range {lo:g}-{hi:g} mm3", volume_mm3))
    lo, hi = ranges.mean_thickness_mm.get(name, (0.0, np.inf))
    if mean_thickness_mm is not None and not lo <= mean_thickness_mm <= hi:
        out.append(("thickness_range", f"{name} mean thickness {mean_thickness_mm:.2f} mm "
                    f"outside the plausible adult range {lo:g}-{hi:g} mm", mean_thickness_mm))
    return out


def typical_volume_problem(name: str, volume_mm3: float,
                           typical: dict[str, tuple[float, float]]) -> tuple[str, str, float] | None:
    """(code, message, value) for a plausible plate volume outside its *typical* adult range
    (a warning: look at the overlay), else None; plates without a sourced range pass."""
    lo, hi = typical.get(name, (0.0, np.inf))
    if lo <= volume_mm3 <= hi:
        return None
    return ("plate_volume", f"{name} volume {volume_mm3:.0f} mm3 outside the typical adult "
            f"range {lo:g}-{hi:g} mm3: check the overlay", volume_mm3)


def bml_problems(labels: np.ndarray, bml_value: int, bone_values: dict[str, int],
                 voxel_volume_mm3: float, ranges: PlausibleRanges) -> list[tuple[str, str, float]]:
    """(structure, message, value) for implausibly large bone-marrow lesions.

    Per bone, the lesions touching it are its share: lesion volume / (bone + its lesions).
    """
    from scipy import ndimage

    bml = labels == bml_value
    n = int(bml.sum())
    if n == 0:
        return []
    out = []
    total = n * voxel_volume_mm3
    if total > ranges.max_bml_volume_mm3:
        out.append(("bone_marrow_lesion", f"bone-marrow lesions {total:.0f} mm3 > the "
                    f"plausible maximum {ranges.max_bml_volume_mm3:g} mm3", total))
    box = tuple(slice(max(0, int(a.min()) - 2), int(a.max()) + 3) for a in np.nonzero(bml))
    sub, sub_bml = labels[box], bml[box]
    comps, _ = ndimage.label(sub_bml)
    counts = np.bincount(labels.ravel())
    for bone, value in bone_values.items():
        near = ndimage.binary_dilation(sub == value) & sub_bml
        ids = np.unique(comps[near])
        own = int(np.isin(comps, ids[ids > 0]).sum())
        nb = int(counts[value]) if value < len(counts) else 0
        share = own / (nb + own) if own else 0.0
        if share > ranges.max_bml_bone_fraction:
            out.append((bone, f"bone-marrow lesions fill {100 * share:.0f}% of the {bone} "
                        f"(> {100 * ranges.max_bml_bone_fraction:g}%)", share))
    return out


def border_fraction(mask: np.ndarray, geometry: Geometry, margin_mm: float) -> float:
    """Share of ``mask`` voxels within ``margin_mm`` of the image border (index box)."""
    idx = np.argwhere(mask)
    if not len(idx):
        return 0.0
    shape = np.asarray(mask.shape)
    sp = np.asarray(geometry.spacing, float)
    edge = np.minimum(idx, shape - 1 - idx) * sp  # mm to the nearest face, per axis
    return float((edge.min(axis=1) < margin_mm).mean())
