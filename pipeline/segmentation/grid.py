"""The network's canonical grid and the resampling onto and off it (segmentation stage).

The canonical grid has its axes along the LPS world axes (axis 0 = patient right->left,
axis 1 = anterior->posterior, axis 2 = inferior->superior) and covers the scan's field of
view; see :mod:`cartiq.segmentation.segmenter`.  Also used by :mod:`cartiq.segmentation.synth` and
:mod:`cartiq.segmentation.train` so that training sees the same grid and intensities as inference.
"""

from __future__ import annotations

import numpy as np

from cartiq.io.volume import Geometry

__all__ = ["canonical_geometry", "normalize_array", "resample_array"]


def axis_spacing_along(geom: Geometry, world_axis: int) -> float:
    """Spacing of the index axis that points most nearly along ``world_axis``."""
    m = np.abs(geom.matrix)
    return float(geom.spacing[int(np.argmax(m[world_axis]))])


def canonical_geometry(geom: Geometry, spacing_mm: tuple[float, float, float]) -> Geometry:
    """LPS-aligned grid covering ``geom``'s field of view at ``spacing_mm``."""
    sp = np.asarray(spacing_mm, float)
    n = np.asarray(geom.shape, float)
    corners = np.array([[i, j, k] for i in (-0.5, n[0] - 0.5) for j in (-0.5, n[1] - 0.5)
                        for k in (-0.5, n[2] - 0.5)])
    world = geom.index_to_world(corners)
    lo, hi = world.min(0), world.max(0)
    size = np.maximum(1, np.ceil((hi - lo) / sp - 1e-6)).astype(int)
    center = (lo + hi) / 2
    origin = center - (size - 1) / 2 * sp
    return Geometry(shape=tuple(int(s) for s in size), spacing=tuple(float(s) for s in sp),
                    origin=tuple(float(o) for o in origin),
                    direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def _to_sitk(array: np.ndarray, geom: Geometry):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    geom.apply_to_sitk(img)
    return img


def resample_array(array: np.ndarray, src: Geometry, dst: Geometry, *, nearest: bool = False,
                   default: float = 0.0) -> np.ndarray:
    """Resample an ITK-ordered array from grid ``src`` onto grid ``dst`` (SimpleITK)."""
    import SimpleITK as sitk

    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in dst.shape])
    f.SetOutputSpacing(dst.spacing)
    f.SetOutputOrigin(dst.origin)
    f.SetOutputDirection(dst.direction)
    f.SetInterpolator(sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear)
    f.SetDefaultPixelValue(default)
    out = f.Execute(_to_sitk(array, src))
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)  # a view: no copy


def normalize_array(array: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Map the intensity percentiles to 0 and 1 and clip to [0, 1] (float32)."""
    a = np.asarray(array, np.float32)
    flat = a.ravel()
    if flat.size > 2_000_000:
        flat = flat[:: flat.size // 2_000_000]
    lo, hi = np.percentile(flat, percentiles)
    return np.clip((a - lo) / max(float(hi - lo), 1e-6), 0, 1).astype(np.float32)
