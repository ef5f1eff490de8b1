"""Rigid registration of a follow-up knee scan to its baseline, one transform per bone.

Each cartilage plate moves with its bone, so femur, tibia and patella are registered
separately (rigid, 6 degrees of freedom) with SimpleITK:

1. **Bone masks**: the bone label plus the bone-marrow-lesion voxels inside it (a BML
   replaces bone voxels in the label map, but is still bone).
2. **Initialisation by moments**: the centres of mass of the two bone masks are aligned;
   a second start also aligns their principal axes (axis signs chosen closest to the
   identity).  Both starts are optimised and the better final metric wins, so offsets of
   10 mm and 10 degrees (and more) are inside the capture range.  When the result still
   leaves a bone-surface residual above half a voxel, six more starts rotated by
   +-``extra_start_deg`` about each axis are tried (costly, but only for hard cases).
3. **Segmentation-driven stage**: mean squares between smoothed signed distance maps of the
   two bone masks (a smooth cost with a wide capture range), evaluated in a band around the
   baseline bone surface.  Where a bone leaves the field of view its cut face is not
   anatomy: masks are extended past the image edge by repeating the edge slice, and points
   near the edge are left out of the metric and of the residual.
4. **Intensity refinement** (when both images are given): Mattes mutual information in a
   thin band around the bone surface, starting from stage 3.  It is kept only when it does
   not worsen the bone-surface residual (so a different sequence or a noisy image cannot
   pull a good segmentation-driven result away).
5. **Quality**: the residual is the symmetric mean distance (mm) between the two bone
   surfaces after registration (baseline surface points mapped into the follow-up distance
   map and vice versa), plus the Dice overlap and volume ratio of the bone masks inside the
   field of view common to both visits.  ``residual_flag`` is set when the residual exceeds
   half a voxel (the cube root of the voxel volume of the coarser visit).

Conventions: world = LPS mm.  ``matrix`` (4x4) maps **follow-up world points to baseline
world points**; the SimpleITK transform written to disk maps baseline points to follow-up
points (ITK's resampling convention: it resamples the follow-up image into baseline space,
and 3D Slicer applies it to the follow-up volume directly).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field
from scipy import ndimage

from pipeline.config import Strict
from pipeline.io import Geometry, Volume
from pipeline.labels import BONES, default_scheme

__all__ = ["RegistrationConfig", "BoneRegistration", "bone_mask", "register_bone",
           "register_visits", "apply_matrix", "rotation_angle_deg", "to_sitk_image"]

log = logging.getLogger(__name__)


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


def _r(x: float, nd: int = 3) -> float | None:
    return None if not np.isfinite(x) else round(float(x), nd)


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.atleast_2d(np.asarray(points, dtype=float))
    return pts @ matrix[:3, :3].T + matrix[:3, 3]


def rotation_angle_deg(rot: np.ndarray) -> float:
    c = (np.trace(rot) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


# ----------------------------------------------------------------------------- masks


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
class _Crop:
    """A cropped, edge-extended region of one visit around one bone."""

    geometry: Geometry  # of the cropped (and padded) grid
    mask: np.ndarray  # bool bone mask (padded by edge replication)
    sdm: np.ndarray  # float32 signed distance (mm), negative inside
    interior: np.ndarray  # bool: inside the original field of view, away from its edge
    box: tuple[slice, ...]  # crop in the original array (before padding)
    pad: np.ndarray  # (3, 2) voxels padded before/after per axis
    full_shape: tuple[int, ...]  # shape of the uncropped scan


def _make_crop(mask: np.ndarray, geom: Geometry, cfg: RegistrationConfig) -> _Crop:
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
    return _Crop(geometry=g, mask=sub, sdm=_signed_distance(sub, spacing, cfg), interior=interior,
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


def _isotropic(crop: _Crop, cfg: RegistrationConfig):
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


def _surface_points(crop: _Crop, cfg: RegistrationConfig) -> np.ndarray:
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


def _sample(crop: _Crop, points_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance at world points, and whether each point lies in ``crop.interior``."""
    ijk = crop.geometry.world_to_index(points_world)
    vals = ndimage.map_coordinates(crop.sdm, ijk.T, order=1, mode="nearest")
    inside = ndimage.map_coordinates(crop.interior.astype(np.float32), ijk.T, order=0,
                                     mode="constant", cval=0.0) > 0.5
    return vals, inside


# ----------------------------------------------------------------------------- transforms


def _euler_to_matrix(tx) -> np.ndarray:
    """4x4 of a SimpleITK rigid transform (maps baseline -> follow-up)."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(tx.GetMatrix()).reshape(3, 3)
    c = np.asarray(tx.GetCenter())
    a[:3, 3] = np.asarray(tx.GetTranslation()) + c - a[:3, :3] @ c
    return a


def _moments(mask: np.ndarray, geom: Geometry) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(mask)
    if len(idx) > 200_000:
        idx = idx[:: len(idx) // 200_000 + 1]
    pts = geom.index_to_world(idx.astype(float))
    c = pts.mean(axis=0)
    _, vecs = np.linalg.eigh(np.cov((pts - c).T))
    return c, vecs


def _principal_rotation(vf: np.ndarray, vm: np.ndarray) -> np.ndarray:
    """Rotation taking fixed principal axes onto moving ones, closest to the identity."""
    vf, vm = vf * np.sign(np.linalg.det(vf)), vm * np.sign(np.linalg.det(vm))  # proper frames
    cands = [vm @ np.diag([sx, sy, sx * sy]) @ vf.T for sx in (1, -1) for sy in (1, -1)]
    return min(cands, key=rotation_angle_deg)


def _register_stage(fixed, moving, init, *, metric: str, fixed_mask, moving_mask,
                    cfg: RegistrationConfig, sigmas: list[float], learning_rate: float,
                    iterations: int, shrink: list[int] | None = None):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    if metric == "meansquares":
        reg.SetMetricAsMeanSquares()
    else:
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    n_mask = max(float(np.count_nonzero(sitk.GetArrayViewFromImage(fixed_mask))), 1.0)
    levels = len(sigmas)
    # fewer samples on the coarse levels (a shrunk grid has fewer voxels anyway)
    frac = [min(1.0, cfg.metric_samples / n_mask / 2 ** (levels - 1 - i)) for i in range(levels)]
    reg.SetMetricSamplingPercentagePerLevel([float(f) for f in frac], cfg.seed)
    reg.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate, minStep=5e-3, numberOfIterations=iterations,
        relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink or [1] * len(sigmas))
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(sitk.Euler3DTransform(init), inPlace=False)
    count = [0]
    reg.AddCommand(sitk.sitkIterationEvent, lambda: count.__setitem__(0, count[0] + 1))
    try:
        out = reg.Execute(fixed, moving)
    except RuntimeError as exc:
        return None, float("inf"), f"failed: {str(exc).strip().splitlines()[-1][:200]}"
    tx = out.GetNthTransform(0) if hasattr(out, "GetNthTransform") and \
        out.GetName() == "CompositeTransform" else out
    stop = f"{reg.GetOptimizerStopConditionDescription()} ({count[0]} iterations in all levels)"
    return sitk.Euler3DTransform(tx), reg.GetMetricValue(), stop


# ----------------------------------------------------------------------------- public API


def register_bone(bone: str, baseline_labels: Volume, followup_labels: Volume, *,
                  baseline_image: Volume | None = None, followup_image: Volume | None = None,
                  config: RegistrationConfig = RegistrationConfig()) -> BoneRegistration:
    """Rigidly register one bone of the follow-up scan to the baseline scan.

    Parameters
    ----------
    bone : ``femur``, ``tibia`` or ``patella``.
    baseline_labels, followup_labels : label maps in the cartiq scheme, each in its own
        scan geometry.
    baseline_image, followup_image : the MR images (same geometry as the label maps), for
        the intensity refinement; skipped when either is None.

    Returns
    -------
    BoneRegistration with ``matrix`` mapping follow-up world (LPS mm) to baseline world,
    residual bone-surface distance (mm) and quality flags.
    """
    import SimpleITK as sitk

    cfg = config
    fm = bone_mask(baseline_labels.array, bone)
    mm = bone_mask(followup_labels.array, bone)
    minvox = 50
    if fm.sum() < minvox or mm.sum() < minvox:
        which = "baseline" if fm.sum() < minvox else "follow-up"
        return BoneRegistration(bone=bone, present=False,
                                reason=f"{bone} is missing from the {which} segmentation")
    fgeo, mgeo = baseline_labels.geometry, followup_labels.geometry
    fc, mc = _make_crop(fm, fgeo, cfg), _make_crop(mm, mgeo, cfg)
    fixed, fixed_in = _isotropic(fc, cfg)
    moving, moving_in = _isotropic(mc, cfg)
    band = sitk.And(sitk.Cast(sitk.Abs(fixed) < cfg.band_mm, sitk.sitkUInt8), fixed_in)
    fixed_mask, moving_mask = band, moving_in
    surfaces = (_surface_points(fc, cfg), _surface_points(mc, cfg))

    c_f, v_f = _moments(fm, fgeo)
    c_m, v_m = _moments(mm, mgeo)
    voxel = max(float(np.prod(fgeo.spacing)) ** (1 / 3), float(np.prod(mgeo.spacing)) ** (1 / 3))
    limit = 0.5 * voxel
    starts = {"centre_of_mass": np.eye(3), "principal_axes": _principal_rotation(v_f, v_m)}
    best, tried = None, {}

    def run_starts(starts: dict[str, np.ndarray]) -> None:
        nonlocal best
        for name, rot in starts.items():
            init = sitk.Euler3DTransform()
            init.SetCenter(tuple(float(v) for v in c_f))
            init.SetMatrix(tuple(float(v) for v in rot.ravel()))
            init.SetTranslation(tuple(float(v) for v in (c_m - c_f)))
            tx, val, stop = _register_stage(
                fixed, moving, init, metric="meansquares", fixed_mask=fixed_mask,
                moving_mask=moving_mask, cfg=cfg, sigmas=[2.0, 1.0, 0.0], learning_rate=2.0,
                iterations=cfg.iterations, shrink=[4, 2, 1])
            tried[name] = {"metric": None if tx is None else round(float(val), 5), "stop": stop}
            if tx is not None and (best is None or val < best[1]):
                best = (tx, val, stop, name)

    if not 3.0 < rotation_angle_deg(starts["principal_axes"]) < 60.0:
        del starts["principal_axes"]  # same as the first start, or uninformative axes
    run_starts(starts)
    res = _residual(best[0], fc, mc, surfaces) if best is not None else (np.inf,) * 3
    if res[0] > limit:  # a local minimum? try rotated starts about each world axis
        from scipy.spatial.transform import Rotation

        run_starts({f"rotated_{ax}{sgn * cfg.extra_start_deg:+.0f}deg": Rotation.from_euler(
            ax, sgn * cfg.extra_start_deg, degrees=True).as_matrix()
            for ax in "xyz" for sgn in (1, -1)})
    if best is None:
        return BoneRegistration(bone=bone, present=True, converged=False,
                                reason=f"{bone}: registration failed ({tried})",
                                details={"starts": tried})
    tx, _, stop, start = best
    res = _residual(tx, fc, mc, surfaces)
    stage = "distance_map"
    intensity = "skipped (no images)"
    if cfg.intensity_refinement and baseline_image is not None and followup_image is not None:
        tx2, intensity = _refine_intensity(tx, baseline_image, followup_image, fc, mc, cfg)
        if tx2 is not None:
            res2 = _residual(tx2, fc, mc, surfaces)
            if res2[0] <= res[0] + cfg.intensity_keep_tolerance_mm:
                tx, res, stage = tx2, res2, "distance_map+intensity"
                intensity = "kept"
            else:
                intensity = f"rejected (residual {res2[0]:.3f} > {res[0]:.3f} mm)"
    mean, rms, p95 = res
    dice, vratio = _overlap(tx, fc, mc)
    hit_max = "Maximum number of iterations" in stop
    converged = bool(np.isfinite(mean) and mean <= cfg.max_residual_mm)
    reason = ""
    if not converged:
        reason = (f"{bone}: residual bone-surface distance {mean:.2f} mm exceeds "
                  f"{cfg.max_residual_mm} mm - registration did not converge")
    elif hit_max:
        reason = f"{bone}: optimizer stopped at the iteration limit"
    matrix_b2f = _euler_to_matrix(tx)
    return BoneRegistration(
        bone=bone, present=True, reason=reason, matrix=np.linalg.inv(matrix_b2f),
        converged=converged, residual_mm=mean, residual_rms_mm=rms, residual_p95_mm=p95,
        residual_limit_mm=limit, residual_flag=bool(not np.isfinite(mean) or mean > limit),
        dice=dice, volume_ratio=vratio, stage=stage, sitk_transform=tx,
        details={"start": start, "starts": tried, "stop_condition": stop,
                 "intensity_refinement": intensity,
                 "baseline_bone_volume_mm3": round(float(fm.sum()) * fgeo.voxel_volume_mm3, 1),
                 "followup_bone_volume_mm3": round(float(mm.sum()) * mgeo.voxel_volume_mm3, 1)})


def _residual(tx, fc: _Crop, mc: _Crop, surfaces: tuple[np.ndarray, np.ndarray]
              ) -> tuple[float, float, float]:
    """Symmetric bone-surface distance (mean, rms, p95; mm) after registration."""
    m = _euler_to_matrix(tx)  # baseline -> follow-up
    d1, in1 = _sample(mc, apply_matrix(m, surfaces[0]))
    d2, in2 = _sample(fc, apply_matrix(np.linalg.inv(m), surfaces[1]))
    d = np.abs(np.concatenate([d1[in1], d2[in2]]))
    if d.size < 20:
        return float("inf"), float("inf"), float("inf")
    return float(d.mean()), float(np.sqrt((d ** 2).mean())), float(np.percentile(d, 95))


def _overlap(tx, fc: _Crop, mc: _Crop) -> tuple[float, float]:
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


def _refine_intensity(tx, bimg: Volume, fimg: Volume, fc: _Crop, mc: _Crop,
                      cfg: RegistrationConfig):
    """Mattes-MI refinement in a band around the bone; returns (transform|None, note).

    The images are cut to the crops (the padding has no image: masks exclude it)."""
    if bimg.array.shape != fc.full_shape or fimg.array.shape != mc.full_shape:
        return None, "skipped (image grid differs from the label map)"
    band = (np.abs(fc.sdm) < cfg.intensity_band_mm) & fc.interior
    if band.sum() < 500:
        return None, "skipped (band too small)"
    fixed = to_sitk_image(np.pad(bimg.array[fc.box].astype(np.float32), fc.pad, mode="edge"),
                          fc.geometry)
    moving = to_sitk_image(np.pad(fimg.array[mc.box].astype(np.float32), mc.pad, mode="edge"),
                           mc.geometry)
    tx2, _, stop = _register_stage(
        fixed, moving, tx, metric="mattes", fixed_mask=to_sitk_image(band, fc.geometry, np.uint8),
        moving_mask=to_sitk_image(mc.interior, mc.geometry, np.uint8), cfg=cfg, sigmas=[0.0],
        learning_rate=0.5, iterations=100)
    if tx2 is None:
        return None, f"skipped ({stop})"
    return tx2, stop


def register_visits(baseline_labels: Volume, followup_labels: Volume, *,
                    baseline_image: Volume | None = None, followup_image: Volume | None = None,
                    bones: tuple[str, ...] = BONES,
                    config: RegistrationConfig = RegistrationConfig()
                    ) -> dict[str, BoneRegistration]:
    """Register every bone; see :func:`register_bone`."""
    out = {}
    for bone in bones:
        r = out[bone] = register_bone(bone, baseline_labels, followup_labels, config=config,
                                      baseline_image=baseline_image, followup_image=followup_image)
        if r.present:
            log.info("%s: residual %.3f mm (limit %.3f), dice %.3f, %s", bone, r.residual_mm,
                     r.residual_limit_mm, r.dice, r.stage)
        else:
            log.warning("%s", r.reason)
    return out
