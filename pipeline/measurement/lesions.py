"""Bone-marrow lesions (BML) from a label map.

A lesion is a connected component of the BML label.  Its bone is the bone label that
touches it most (BML voxels replace bone voxels, so the lesion sits inside or against one
bone).  Sizes:

* ``volume_mm3``: voxel count x voxel volume.
* ``max_slice_area_mm2``: the largest cross-section in one acquired slice (the array axis
  with the coarsest spacing), as read on the images.
* ``max_diameter_mm``: the largest distance between two voxel centres of the lesion plus
  the voxel's extent along that direction (so a one-voxel lesion is one voxel wide).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist, squareform

__all__ = ["LesionComponent", "find_lesions", "max_diameter_mm"]


@dataclass
class LesionComponent:
    id: int
    bone: str
    volume_mm3: float
    max_slice_area_mm2: float
    max_diameter_mm: float
    centroid_index: np.ndarray  # (3,) continuous voxel index
    voxels: np.ndarray  # (K, 3) int indices


def max_diameter_mm(index_points: np.ndarray, spacing: np.ndarray) -> float:
    """Largest centre-to-centre distance plus the voxel extent along that direction."""
    pts = index_points * spacing
    if len(pts) == 1:
        return float(np.max(spacing))
    cand = pts
    if len(pts) > 8:
        try:
            cand = pts[ConvexHull(pts).vertices]
        except QhullError:  # flat lesion: all points in a plane or line
            cand = pts
    if len(cand) > 4000:
        cand = cand[:: len(cand) // 4000 + 1]
    d = squareform(pdist(cand))
    i, j = np.unravel_index(np.argmax(d), d.shape)
    dist = d[i, j]
    u = (cand[j] - cand[i]) / dist
    return float(dist + np.abs(u * spacing).sum())


def find_lesions(labels: np.ndarray, spacing_mm, *, bml_label: int, bones: dict[str, int],
                 slice_axis: int, min_volume_mm3: float = 0.0,
                 connectivity: int = 26) -> list[LesionComponent]:
    """Connected BML components with their bone and sizes (largest first)."""
    import cc3d

    spacing = np.asarray(spacing_mm, dtype=float)
    mask = labels == bml_label
    if not mask.any():
        return []
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    grow = tuple(slice(max(s.start - 2, 0), min(s.stop + 2, n)) for s, n in zip(box, labels.shape))
    sub = labels[grow]
    offset = np.array([s.start for s in grow])
    comps = cc3d.connected_components((sub == bml_label).astype(np.uint8), connectivity=connectivity)
    voxvol = float(np.prod(spacing))
    in_plane = float(np.prod(np.delete(spacing, slice_axis)))
    bone_values = np.array(list(bones.values()))
    bone_names = list(bones.keys())
    out = []
    for cid, slc in enumerate(ndimage.find_objects(comps), start=1):
        if slc is None:
            continue
        local = comps[slc] == cid
        n = int(local.sum())
        if n * voxvol < min_volume_mm3:
            continue
        idx = np.argwhere(local) + np.array([s.start for s in slc])
        # bone: the bone label most present in a one-voxel shell around the lesion
        shell_box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, m)) for s, m in zip(slc, sub.shape))
        comp_box = comps[shell_box] == cid
        shell = ndimage.binary_dilation(comp_box, iterations=1) & ~comp_box
        around = sub[shell_box][shell]
        counts = np.array([(around == v).sum() for v in bone_values])
        bone = bone_names[int(np.argmax(counts))] if counts.max() > 0 else "unknown"
        per_slice = np.bincount(idx[:, slice_axis])
        out.append(LesionComponent(
            id=0, bone=bone, volume_mm3=n * voxvol,
            max_slice_area_mm2=float(per_slice.max()) * in_plane,
            max_diameter_mm=max_diameter_mm(idx.astype(float), spacing),
            centroid_index=idx.mean(axis=0) + offset,
            voxels=idx + offset,
        ))
    out.sort(key=lambda c: -c.volume_mm3)
    for i, c in enumerate(out, start=1):
        c.id = i
    return out
