"""Bone masks, cropped signed-distance maps and bone-surface quality measures (registration).

Each visit is cut to a box around one bone (:class:`BoneCrop`), extended past the image edge
by repeating the edge slice where the bone leaves the field of view, and turned into a
smoothed signed distance map (mm, negative inside).  The registration driver
(:mod:`cartiq.longitudinal.register`) optimises on these maps; :func:`residual` and :func:`overlap`
measure the result on the bone surfaces and masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cartiq.io.volume import Geometry
from cartiq.io.labels import default_scheme
from cartiq.longitudinal.records import RegistrationConfig, euler_to_matrix, apply_matrix

__all__ = ["bone_mask", "to_sitk_image", "normal_voxel_extent"]


def bone_mask(labels: np.ndarray, bone: str) -> np.ndarray:
    """Bone label plus the bone-marrow-lesion voxels touching it (bool)."""
    scheme = default_scheme()
    mask = labels == scheme[bone]
    bml = labels == scheme["bone_marrow_lesion"]
    if bml.any() and mask.any():
        import cc3d

        comps = cc3d.connected_components(bml.astype(np.uint8), connectivity=26)
        touching = np.unique(comps[ndimage.binary_dilation(mask, iterations=1) & bml])
        touching = touching[touching > 0]
        if touching.size:
            mask = mask | np.isin(comps, touching)
    return mask


@dataclass
class BoneCrop:
    """A cropped, edge-extended region of one visit around one bone."""

    geometry: Geometry  # of the cropped (and padded) grid
    mask: np.ndarray  # bool bone mask (padded by edge replication)
    sdm: np.ndarray  # float32 signed distance (mm), negative inside
    interior: np.ndarray  # bool: inside the original field of view, away from its edge
    box: tuple[slice, ...]  # crop in the original array (before padding)
    pad: np.ndarray  # (3, 2) voxels padded before/after per axis
    full_shape: tuple[int, ...]  # shape of the uncropped scan


def make_crop(mask: np.ndarray, geom: Geometry, cfg: RegistrationConfig) -> BoneCrop:
    spacing = np.asarray(geom.spacing, dtype=float)
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    m = np.ceil(cfg.crop_margin_mm / spacing).astype(int)
    lo_c, hi_c = np.maximum(lo - m, 0), np.minimum(hi + m, mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo_c, hi_c))
    # extend past the field of view where the crop reaches the image edge
    ext = np.ceil(cfg.crop_margin_mm / spacing).astype(int)
    pad = np.zeros((3, 2), dtype=int)
    for ax in range(3):
        pad[ax, 0] = ext[ax] if lo_c[ax] == 0 else 0
        pad[ax, 1] = ext[ax] if hi_c[ax] == mask.shape[ax] else 0
    sub = np.pad(mask[box], pad, mode="edge")
    interior = np.zeros(sub.shape, dtype=bool)
    fm = np.ceil(cfg.fov_margin_mm / spacing).astype(int)
    inner = []
    for ax in range(3):
        first = pad[ax, 0] + (fm[ax] if lo_c[ax] == 0 else 0)
        last = sub.shape[ax] - pad[ax, 1] - (fm[ax] if hi_c[ax] == mask.shape[ax] else 0)
        inner.append(slice(int(first), int(max(last, first))))
    interior[tuple(inner)] = True
    origin = geom.index_to_world((lo_c - pad[:, 0])[None, :].astype(float))[0]
    g = Geometry(shape=tuple(int(n) for n in sub.shape), spacing=geom.spacing,
                 origin=tuple(float(v) for v in origin), direction=geom.direction)
    return BoneCrop(geometry=g, mask=sub, sdm=_signed_distance(sub, spacing, cfg), interior=interior,
                 box=box, pad=pad, full_shape=tuple(mask.shape))


def _signed_distance(mask: np.ndarray, spacing: np.ndarray, cfg: RegistrationConfig) -> np.ndarray:
    import edt

    sp = tuple(float(s) for s in spacing)
    inside = edt.edt(np.ascontiguousarray(mask, dtype=np.uint8), anisotropy=sp)
    outside = edt.edt(np.ascontiguousarray(~mask, dtype=np.uint8), anisotropy=sp)
    # voxel centres: distance to the boundary is about half a voxel less than edt's value
    sdm = np.where(mask, -(inside - 0.5 * min(sp)), outside - 0.5 * min(sp)).astype(np.float32)
    if cfg.distance_smoothing_mm > 0:
        sdm = ndimage.gaussian_filter(sdm, sigma=cfg.distance_smoothing_mm / spacing,
                                      mode="nearest", truncate=3.0)
    return np.clip(sdm, -cfg.distance_clamp_mm, cfg.distance_clamp_mm)


def to_sitk_image(array: np.ndarray, geom: Geometry, dtype=np.float32):
    """SimpleITK image of an ITK-index-order array with ``geom``."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(dtype).transpose(2, 1, 0)))
    geom.apply_to_sitk(img)
    return img


def isotropic(crop: BoneCrop, cfg: RegistrationConfig):
    """Distance map and interior mask of a crop on an isotropic grid (SimpleITK images)."""
    import SimpleITK as sitk

    sdm = to_sitk_image(crop.sdm, crop.geometry)
    extent = np.asarray(crop.geometry.shape) * np.asarray(crop.geometry.spacing)
    size = [max(int(np.ceil(e / cfg.work_spacing_mm)), 4) for e in extent]
    spacing = [cfg.work_spacing_mm] * 3
    origin = crop.geometry.index_to_world(np.full((1, 3), -0.5))[0] + \
        crop.geometry.matrix @ np.full(3, 0.5 * cfg.work_spacing_mm)
    grid = (size, sitk.Transform(), None, tuple(origin), tuple(spacing), crop.geometry.direction)
    iso = sitk.Resample(sdm, *grid[:2], sitk.sitkLinear, *grid[3:], float(cfg.distance_clamp_mm),
                        sitk.sitkFloat32)
    interior = sitk.Resample(to_sitk_image(crop.interior, crop.geometry, np.uint8), *grid[:2],
                             sitk.sitkNearestNeighbor, *grid[3:], 0, sitk.sitkUInt8)
    return iso, interior


def surface_points(crop: BoneCrop, cfg: RegistrationConfig) -> np.ndarray:
    """World points on the bone surface (zero level of the distance map), away from edges."""
    from skimage.measure import marching_cubes

    if crop.sdm.min() >= 0 or crop.sdm.max() <= 0:
        return np.zeros((0, 3))  # no surface: the residual becomes infinite
    verts, _, _, _ = marching_cubes(crop.sdm, level=0.0)
    keep = ndimage.map_coordinates(crop.interior.astype(np.float32), verts.T, order=0) > 0.5
    verts = verts[keep]
    if len(verts) > cfg.max_points:
        rng = np.random.default_rng(cfg.seed)
        verts = verts[rng.choice(len(verts), cfg.max_points, replace=False)]
    return crop.geometry.index_to_world(verts)


def normal_voxel_extent(crop: BoneCrop) -> float:
    """Mean extent (mm) of one voxel along the bone-surface normal, area-weighted.

    A voxel with edges ``s_k`` measures ``sum_k s_k |n_k|`` along the unit normal ``n``
    (``n_k`` in the voxel-axis frame): ``s`` where the surface faces an axis, up to
    ``sum(s) / sqrt(3)`` on a diagonal; over a sphere the mean is ``sum(s) / 2``.  Averaged
    over the triangles of the bone surface (zero level of the distance map, marching cubes
    in mm) inside the field of view, weighted by their area.  The registration residual
    limit is a multiple of it: two segmentations of one bone that disagree by one voxel
    everywhere differ by this much on average.
    """
    from skimage.measure import marching_cubes

    sp = np.asarray(crop.geometry.spacing, dtype=float)
    if crop.sdm.min() >= 0 or crop.sdm.max() <= 0:
        return float(sp.sum() / 2.0)
    verts, faces, _, _ = marching_cubes(crop.sdm, level=0.0, spacing=tuple(sp))
    tri = verts[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = np.linalg.norm(cross, axis=1)
    centre = tri.mean(axis=1) / sp  # voxel index of each triangle's centre
    keep = (area > 0) & (ndimage.map_coordinates(crop.interior.astype(np.float32), centre.T,
                                                 order=0) > 0.5)
    if not keep.any():
        return float(sp.sum() / 2.0)
    extent = (np.abs(cross[keep]) / area[keep, None] * sp).sum(axis=1)
    return float((extent * area[keep]).sum() / area[keep].sum())


def _sample(crop: BoneCrop, points_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance at world points, and whether each point lies in ``crop.interior``."""
    ijk = crop.geometry.world_to_index(points_world)
    vals = ndimage.map_coordinates(crop.sdm, ijk.T, order=1, mode="nearest")
    inside = ndimage.map_coordinates(crop.interior.astype(np.float32), ijk.T, order=0,
                                     mode="constant", cval=0.0) > 0.5
    return vals, inside


# ----------------------------------------------------------------------------- quality


def residual(tx, fc: BoneCrop, mc: BoneCrop, surfaces: tuple[np.ndarray, np.ndarray]
              ) -> tuple[float, float, float]:
    """Symmetric bone-surface distance (mean, rms, p95; mm) after registration."""
    m = euler_to_matrix(tx)  # baseline -> follow-up
    d1, in1 = _sample(mc, apply_matrix(m, surfaces[0]))
    d2, in2 = _sample(fc, apply_matrix(np.linalg.inv(m), surfaces[1]))
    d = np.abs(np.concatenate([d1[in1], d2[in2]]))
    if d.size < 20:
        return float("inf"), float("inf"), float("inf")
    return float(d.mean()), float(np.sqrt((d ** 2).mean())), float(np.percentile(d, 95))


def overlap(tx, fc: BoneCrop, mc: BoneCrop) -> tuple[float, float]:
    """Dice and volume ratio (follow-up / baseline) of the bone masks in the common FOV."""
    import SimpleITK as sitk

    ref = to_sitk_image(fc.mask, fc.geometry, np.uint8)
    mov = to_sitk_image(mc.mask, mc.geometry, np.uint8)
    movi = to_sitk_image(mc.interior, mc.geometry, np.uint8)
    warped = sitk.GetArrayFromImage(sitk.Resample(mov, ref, tx, sitk.sitkNearestNeighbor, 0)
                                    ).transpose(2, 1, 0).astype(bool)
    inside = sitk.GetArrayFromImage(sitk.Resample(movi, ref, tx, sitk.sitkNearestNeighbor, 0)
                                    ).transpose(2, 1, 0).astype(bool) & fc.interior
    a, b = fc.mask & inside, warped & inside
    if a.sum() == 0:
        return float("nan"), float("nan")
    dice = 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())
    return dice, float(b.sum()) / float(a.sum())
