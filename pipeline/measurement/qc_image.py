"""QC checks that read the image: a bone label drawn over tissue unlike the bone's own marrow.

The slices are found by :func:`cartiq.segmentation.marrow.unlike_marrow_slices` (the median
grey of a slice's bone voxels against the median and MAD of the bone's core; brighter only).
The segmenter already removes such slices where they end a bone
(:func:`cartiq.segmentation.marrow.drop_unlike_marrow`); this flag warns about what is left,
and about segmentations made elsewhere (``cartiq measure``, ``cartiq qc``).
"""

from __future__ import annotations

import numpy as np

from cartiq.io.volume import Geometry
from cartiq.segmentation.marrow import BoneGreyLimits, unlike_marrow_slices

__all__ = ["BoneGreyLimits", "unlike_marrow_slices", "bone_grey_problems"]


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
