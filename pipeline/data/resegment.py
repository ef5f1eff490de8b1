"""A "no-change" follow-up of a real label map: the same knee re-positioned and re-segmented.

Used to calibrate and test the longitudinal registration flags (and for precision
benchmarks): a second visit with no anatomical change differs from the first only by

1. the knee's position in the scanner: a small rigid motion, the label map re-sampled onto
   the scan grid by nearest neighbour (so the boundary is re-quantised, up to one voxel);
2. re-segmentation noise: a one-voxel boundary jitter - in smooth random patches (a Gaussian
   random field of ``patch_mm`` correlation length) the chosen structures grow by one voxel
   into background, in others they lose their outermost voxel layer to background.

Only voxels next to background change, so bone never eats cartilage and no gap opens
between them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from cartiq.io.volume import Geometry, Volume

__all__ = ["rigid_motion", "resample_labels", "boundary_jitter", "resegmented_followup"]


def rigid_motion(rotation_deg, translation_mm, centre_mm) -> np.ndarray:
    """4x4 moving world points: rotation (xyz Euler, degrees) about ``centre_mm``, then
    translation (mm)."""
    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
    c = np.asarray(centre_mm, dtype=float)
    m[:3, 3] = c - m[:3, :3] @ c + np.asarray(translation_mm, dtype=float)
    return m


def resample_labels(labels: Volume, motion: np.ndarray, geometry: Geometry | None = None) -> Volume:
    """The anatomy of ``labels`` moved by ``motion`` (world -> world), nearest neighbour, on
    ``geometry`` (default: the same grid)."""
    import SimpleITK as sitk

    geo = geometry or labels.geometry
    inv = np.linalg.inv(motion)  # resampling maps output points back to input points
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(float(v) for v in inv[:3, :3].ravel()))
    tx.SetTranslation(tuple(float(v) for v in inv[:3, 3]))
    src = sitk.GetImageFromArray(np.ascontiguousarray(labels.array.astype(np.uint8).transpose(2, 1, 0)))
    labels.geometry.apply_to_sitk(src)
    ref = sitk.Image(*[int(n) for n in geo.shape], sitk.sitkUInt8)
    geo.apply_to_sitk(ref)
    out = sitk.Resample(src, ref, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return Volume(sitk.GetArrayFromImage(out).transpose(2, 1, 0).copy(), geo)


def boundary_jitter(array: np.ndarray, spacing, values, *, seed: int = 0,
                    patch_mm: float = 3.0, threshold: float = 0.5) -> np.ndarray:
    """One-voxel boundary jitter of the label ``values`` against background (a copy).

    A unit-variance Gaussian random field with correlation length ``patch_mm`` decides
    where: above ``threshold`` a structure grows by one voxel (6-neighbourhood) into
    background, below ``-threshold`` its voxels next to background become background (with
    the default 0.5, about 31% of the boundary grows and 31% shrinks)."""
    rng = np.random.default_rng(seed)
    out = np.asarray(array).copy()
    sp = np.asarray(spacing, dtype=float)
    field = ndimage.gaussian_filter(rng.standard_normal(out.shape).astype(np.float32),
                                    sigma=patch_mm / sp, mode="wrap")
    field /= max(float(field.std()), 1e-12)
    for v in values:
        mask = out == v
        if not mask.any():
            continue
        background = out == 0
        grow = ndimage.binary_dilation(mask) & background & (field > threshold)
        shrink = mask & ndimage.binary_dilation(background) & (field < -threshold)
        out[grow] = v
        out[shrink] = 0
    return out


def resegmented_followup(labels: Volume, *, rotation_deg=(2.0, -1.5, 1.0),
                         translation_mm=(1.2, -0.8, 1.5), values=(), seed: int = 0,
                         patch_mm: float = 3.0, geometry: Geometry | None = None
                         ) -> tuple[Volume, np.ndarray]:
    """(follow-up label map, motion 4x4 baseline world -> follow-up world): ``labels``
    moved about the centre of its grid, re-sampled, and jittered at ``values``."""
    g = labels.geometry
    centre = g.index_to_world((np.asarray(g.shape, dtype=float) - 1)[None] / 2.0)[0]
    motion = rigid_motion(rotation_deg, translation_mm, centre)
    moved = resample_labels(labels, motion, geometry)
    arr = boundary_jitter(moved.array, moved.geometry.spacing, values, seed=seed,
                          patch_mm=patch_mm) if len(values) else moved.array
    return Volume(arr, moved.geometry), motion
