"""QC checks that read the image: a bone label drawn over tissue unlike the bone's own marrow.

A network can carry a bone's label past the bone's last true slice, over the neighbouring
tissue: on the real qDESS sample the default model draws the femur around the bright fluid of
the lateral recess on the four slices beyond the lateral condyle, and femoral cartilage along
it.  Marrow has one grey within a scan (lesions are labelled apart), so a slice whose bone
voxels are mostly far brighter than the bone's own core is not marrow.  The check compares,
across the scan's slices (its coarsest voxel axis), the median grey of each slice's bone
voxels with the median and spread (MAD) of the grey of the bone's core (voxels at least
``core_depth_mm`` inside it).
It needs no contrast model: the reference is the same bone in the same image.

Brighter only: in the fluid-sensitive contrasts cartilage is read on (DESS, PD / T2 with or
without fat suppression) fluid is brighter than marrow; a bone's thin last slices are darker
than its core in every contrast (the cortex), which is not an error.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field
from scipy import ndimage

from cartiq.config import Strict
from cartiq.io.volume import Geometry

__all__ = ["BoneGreyLimits", "unlike_marrow_slices", "bone_grey_problems"]


class BoneGreyLimits(Strict):
    """Settings of the ``bone_grey`` QC flag (warning)."""

    core_depth_mm: float = Field(3.0, gt=0, description="a bone's core: its voxels at least "
                                 "this far inside it")
    spread_factor: float = Field(5.0, gt=0, description="a slice is unlike the marrow when "
                                 "its bone voxels' median grey is more than this many robust "
                                 "standard deviations (1.4826 x MAD) above the core's median")
    min_slice_voxels: int = Field(20, ge=1, description="slices with fewer bone voxels are "
                                  "not judged")
    max_volume_mm3: float = Field(1000.0, ge=0, description="warning when a bone's voxels on "
                                  "such slices add up to more than this")


def unlike_marrow_slices(image: np.ndarray, mask: np.ndarray, geometry: Geometry,
                         limits: BoneGreyLimits) -> list[tuple[int, int]]:
    """``(slice index, bone voxels)`` of every slice across the scan's slice axis
    (:meth:`Geometry.slice_axis`, the coarsest spacing) whose
    bone voxels' median grey is more than ``spread_factor`` robust standard deviations above
    the median of the bone's core (median and MAD: a false part of the label that reaches
    into the core does not move them); empty when the bone has no core (too thin to judge)."""
    spacing = np.asarray(geometry.spacing, float)
    if not mask.any():
        return []
    axis = geometry.slice_axis()
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    m, img = mask[box], image[box]
    depth = ndimage.distance_transform_edt(np.pad(m, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    core = m & (depth >= limits.core_depth_mm)
    if core.sum() < limits.min_slice_voxels:
        return []
    grey = img[core]
    centre = float(np.median(grey))
    spread = 1.4826 * float(np.median(np.abs(grey - centre)))
    high = centre + limits.spread_factor * spread
    out = []
    for k in range(m.shape[axis]):
        sel = m.take(k, axis=axis)
        n = int(sel.sum())
        if n >= limits.min_slice_voxels and float(np.median(img.take(k, axis=axis)[sel])) > high:
            out.append((k + box[axis].start, n))
    return out


def bone_grey_problems(image: np.ndarray, labels: np.ndarray, geometry: Geometry,
                       bones: dict[str, int], limits: BoneGreyLimits
                       ) -> list[tuple[str, str, float]]:
    """``(bone, message, volume mm3)`` for every bone in ``bones`` (name -> label value) whose
    slices unlike its marrow hold more than ``max_volume_mm3`` of it."""
    if image.shape != labels.shape:
        raise ValueError(f"image shape {image.shape} is not the labels' {labels.shape}")
    vox = geometry.voxel_volume_mm3
    problems = []
    for name, value in bones.items():
        hits = unlike_marrow_slices(image, labels == value, geometry, limits)
        volume = sum(n for _, n in hits) * vox
        if volume > limits.max_volume_mm3:
            where = ", ".join(str(k) for k, _ in hits)
            problems.append((name, f"{name} drawn over tissue brighter than its marrow on "
                             f"slice(s) {where} of the scan ({volume:.0f} mm3): look at those slices; "
                             "cartilage drawn along it may be false", volume))
    return problems
