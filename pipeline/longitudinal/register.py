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
   what two segmentations of the same bone differ by: ``residual_limit_voxels`` (default 1)
   times the mean extent of one voxel along the bone-surface normal
   (:func:`~cartiq.longitudinal.crops.normal_voxel_extent`, the coarser of the two visits;
   0.64-0.71 mm at OAI DESS 0.36 x 0.36 x 0.7 mm).  Calibration: no-change pairs of two
   real label maps (re-sampled after a small motion, +-1 voxel boundary jitter) give
   0.18-0.27 mm, a follow-up from another knee 1.9-3.7 mm
   (``benchmarks/registration_flag_bench.py``, ``docs/longitudinal.md``).

Conventions: world = LPS mm.  ``matrix`` (4x4) maps **follow-up world points to baseline
world points**; the SimpleITK transform written to disk maps baseline points to follow-up
points (ITK's resampling convention: it resamples the follow-up image into baseline space,
and 3D Slicer applies it to the follow-up volume directly).

Modules: the configuration, the result record and the matrix helpers live in
:mod:`cartiq.longitudinal.records`; bone masks, crops, distance maps and the residual/overlap
measures in :mod:`cartiq.longitudinal.crops`; this module drives SimpleITK (starts, stages,
intensity refinement).  Every public name is importable from here.
"""

from __future__ import annotations

import logging

import numpy as np

from cartiq.io.volume import Geometry, Volume
from cartiq.io.labels import BONES
from cartiq.longitudinal.crops import (
    BoneCrop,
    isotropic,
    make_crop,
    normal_voxel_extent,
    overlap,
    residual,
    surface_points,
    bone_mask,
    to_sitk_image,
)
from cartiq.longitudinal.records import (
    BoneRegistration,
    RegistrationConfig,
    euler_to_matrix,
    apply_matrix,
    rotation_angle_deg,
)

__all__ = ["RegistrationConfig", "BoneRegistration", "bone_mask", "register_bone",
           "register_visits", "apply_matrix", "rotation_angle_deg", "to_sitk_image"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- initialisation


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
    fc, mc = make_crop(fm, fgeo, cfg), make_crop(mm, mgeo, cfg)
    fixed, fixed_in = isotropic(fc, cfg)
    moving, moving_in = isotropic(mc, cfg)
    band = sitk.And(sitk.Cast(sitk.Abs(fixed) < cfg.band_mm, sitk.sitkUInt8), fixed_in)
    fixed_mask, moving_mask = band, moving_in
    surfaces = (surface_points(fc, cfg), surface_points(mc, cfg))

    c_f, v_f = _moments(fm, fgeo)
    c_m, v_m = _moments(mm, mgeo)
    voxel = max(float(np.prod(fgeo.spacing)) ** (1 / 3), float(np.prod(mgeo.spacing)) ** (1 / 3))
    retry_above = 0.5 * voxel  # a result this far off may be a local minimum: more starts
    normal_extent = max(normal_voxel_extent(fc), normal_voxel_extent(mc))
    limit = cfg.residual_limit_voxels * normal_extent
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
    res = residual(best[0], fc, mc, surfaces) if best is not None else (np.inf,) * 3
    if res[0] > retry_above:  # a local minimum? try rotated starts about each world axis
        from scipy.spatial.transform import Rotation

        run_starts({f"rotated_{ax}{sgn * cfg.extra_start_deg:+.0f}deg": Rotation.from_euler(
            ax, sgn * cfg.extra_start_deg, degrees=True).as_matrix()
            for ax in "xyz" for sgn in (1, -1)})
    if best is None:
        return BoneRegistration(bone=bone, present=True, converged=False,
                                reason=f"{bone}: registration failed ({tried})",
                                details={"starts": tried})
    tx, _, stop, start = best
    res = residual(tx, fc, mc, surfaces)
    stage = "distance_map"
    intensity = "skipped (no images)"
    if cfg.intensity_refinement and baseline_image is not None and followup_image is not None:
        tx2, intensity = _refine_intensity(tx, baseline_image, followup_image, fc, mc, cfg)
        if tx2 is not None:
            res2 = residual(tx2, fc, mc, surfaces)
            if res2[0] <= res[0] + cfg.intensity_keep_tolerance_mm:
                tx, res, stage = tx2, res2, "distance_map+intensity"
                intensity = "kept"
            else:
                intensity = f"rejected (residual {res2[0]:.3f} > {res[0]:.3f} mm)"
    mean, rms, p95 = res
    dice, vratio = overlap(tx, fc, mc)
    hit_max = "Maximum number of iterations" in stop
    converged = bool(np.isfinite(mean) and mean <= cfg.max_residual_mm)
    reason = ""
    if not converged:
        reason = (f"{bone}: residual bone-surface distance {mean:.2f} mm exceeds "
                  f"{cfg.max_residual_mm} mm - registration did not converge")
    elif hit_max:
        reason = f"{bone}: optimizer stopped at the iteration limit"
    matrix_b2f = euler_to_matrix(tx)
    return BoneRegistration(
        bone=bone, present=True, reason=reason, matrix=np.linalg.inv(matrix_b2f),
        converged=converged, residual_mm=mean, residual_rms_mm=rms, residual_p95_mm=p95,
        residual_limit_mm=limit, residual_flag=bool(not np.isfinite(mean) or mean > limit),
        dice=dice, volume_ratio=vratio, stage=stage, sitk_transform=tx,
        details={"start": start, "starts": tried, "stop_condition": stop,
                 "voxel_extent_along_normal_mm": round(normal_extent, 3),
                 "intensity_refinement": intensity,
                 "baseline_bone_volume_mm3": round(float(fm.sum()) * fgeo.voxel_volume_mm3, 1),
                 "followup_bone_volume_mm3": round(float(mm.sum()) * mgeo.voxel_volume_mm3, 1)})


def _refine_intensity(tx, bimg: Volume, fimg: Volume, fc: BoneCrop, mc: BoneCrop,
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
