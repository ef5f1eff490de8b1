"""Bone labels drawn over tissue unlike the bone's own marrow, found and removed.

A network can carry a bone's label past the bone's last true slice, over the neighbouring
tissue: on the real qDESS sample the default model draws the femur around the bright fluid of
the lateral recess on the four slices beyond the lateral condyle (with femoral cartilage along
it), the patella over the medial retinaculum on eight slices before the patella begins, and
the tibia over soft tissue and fluid at both ends of the plateau.  Marrow has one grey within a
scan (lesions are labelled apart), so a slice whose bone voxels are mostly far brighter than
the bone's own core is not marrow.  :func:`unlike_marrow_slices` compares, across the scan's
slices (its coarsest voxel axis), the median grey of each slice's bone voxels with the median
and spread (MAD) of the grey of the bone's core (voxels at least ``core_depth_mm`` inside it).
It needs no contrast model: the reference is the same bone in the same image.

Brighter only: in the fluid-sensitive contrasts cartilage is read on (DESS, PD / T2 with or
without fat suppression) fluid is brighter than marrow; a bone's thin last slices are darker
than its core in every contrast (the cortex), which is not an error.

Two users: the QC flag ``bone_grey`` (:mod:`cartiq.measurement.qc_image`) warns about any
such slices; :func:`drop_unlike_marrow`, part of the segmenter's clean-up, removes the bone
and its cartilage on the runs of such slices that end the bone's extent - a bone cannot
continue past a slice that shows none of it, so only the ends are removed, never the middle.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pydantic import Field
from scipy import ndimage

from cartiq.config import Strict
from cartiq.io.volume import Geometry

__all__ = ["BoneGreyLimits", "unlike_marrow_slices", "end_runs", "drop_unlike_marrow"]

log = logging.getLogger(__name__)


class BoneGreyLimits(Strict):
    """Which slices of a bone label are unlike its marrow (QC ``bone_grey`` and the
    segmenter's clean-up)."""

    core_depth_mm: float = Field(3.0, gt=0, description="a bone's core: its voxels at least "
                                 "this far inside it")
    spread_factor: float = Field(5.0, gt=0, description="a slice is unlike the marrow when "
                                 "its bone voxels' median grey is more than this many robust "
                                 "standard deviations (1.4826 x MAD) above the core's median")
    min_slice_voxels: int = Field(20, ge=1, description="slices with fewer bone voxels are "
                                  "not judged")
    max_volume_mm3: float = Field(1000.0, ge=0, description="QC warning when a bone's voxels "
                                  "on such slices add up to more than this")


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


def end_runs(voxels_per_slice: np.ndarray, flagged: set[int], min_slice_voxels: int
             ) -> list[int]:
    """The slices to remove from a bone: from each end of its extent (the slices with any of
    its voxels) inward, every slice up to the innermost flagged one of an unbroken run of
    flagged or too-small-to-judge slices.  A judged slice that is not flagged ends the run;
    a run without a flagged slice removes nothing."""
    present = np.flatnonzero(voxels_per_slice)
    out: set[int] = set()
    for order in (present, present[::-1]):
        run: list[int] = []
        last_flagged = -1
        for k in order:
            k = int(k)
            if k in flagged:
                run.append(k)
                last_flagged = len(run)
            elif voxels_per_slice[k] < min_slice_voxels:
                run.append(k)
            else:
                break
        out.update(run[:last_flagged] if last_flagged > 0 else [])
    return sorted(out)


def drop_unlike_marrow(labels: np.ndarray, image: np.ndarray, geometry: Geometry,
                       bones: dict[int, list[int]], limits: BoneGreyLimits,
                       names: dict[int, str] | None = None,
                       max_fraction: float = 0.5) -> list[dict[str, Any]]:
    """Remove, in place, each bone (label value -> the values of its cartilage) on the
    :func:`end_runs` of its :func:`unlike_marrow_slices`, with its cartilage on those
    slices.  A bone that would lose more than ``max_fraction`` of its voxels is left as it is
    (its core grey cannot be trusted then; QC still flags it).  Returns one record per bone
    changed: ``bone``, ``slices``, ``removed_mm3`` per label name (``names``: value -> name)."""
    if image.shape != labels.shape:
        raise ValueError(f"image shape {image.shape} is not the labels' {labels.shape}")
    names = names or {}
    axis = geometry.slice_axis()
    others = tuple(a for a in range(3) if a != axis)
    vox = geometry.voxel_volume_mm3
    records = []
    for bone, carts in bones.items():
        mask = labels == bone
        hits = unlike_marrow_slices(image, mask, geometry, limits)
        if not hits:
            continue
        per_slice = mask.sum(axis=others)
        drop = end_runs(per_slice, {k for k, _ in hits}, limits.min_slice_voxels)
        if not drop:
            continue
        if per_slice[drop].sum() > max_fraction * per_slice.sum():
            log.warning("%s: %d slices unlike its marrow at its ends hold more than %.0f%% of "
                        "it; left as it is", names.get(bone, bone), len(drop), 100 * max_fraction)
            continue
        moved = np.moveaxis(labels, axis, 0)  # a view: writes reach ``labels``
        counts = dict.fromkeys((bone, *carts), 0)
        for k in drop:
            plane = moved[k]
            for value in counts:
                sel = plane == value
                counts[value] += int(sel.sum())
                plane[sel] = 0
        removed = {names.get(v, str(v)): round(n * vox, 1) for v, n in counts.items() if n}
        name = names.get(bone, str(bone))
        log.info("removed %s on slice(s) %s, drawn over tissue brighter than its marrow "
                 "(%s mm3)", name, ", ".join(map(str, drop)),
                 ", ".join(f"{k} {v:.0f}" for k, v in removed.items()))
        records.append({"bone": name, "slices": drop, "removed_mm3": removed})
    return records
