"""Measured quantities behind the MOCART-like items, from columns cast through a repair site.

Method
------
Around each site a local frame is set up: origin ``c`` near the site's centroid, ``n`` the
normal of the subchondral bone surface (pointing from the bone into the plate's cartilage)
and ``e1``, ``e2`` spanning the tangent plane.  A square grid of columns ``grid_mm`` apart
covers a disc of radius ``R`` in the tangent plane; along each column the label indicators
and the image are sampled every ``step_mm`` from ``bone_depth_mm`` below to
``max_height_mm`` above ``c`` (trilinear interpolation for the masks and the image, nearest
neighbour for site masks and lesion components).  All sampling happens at world (LPS mm)
positions, so the results do not depend on how a file orders or flips its axes.

Per column (heights along ``n``, in mm):

* ``b`` bone surface: the topmost 0.5 crossing of the bone indicator (bone or BML label);
* ``t`` cartilage thickness: integral of the plate's cartilage indicator above
  ``b - bone_margin``; ``tc = t * cos(theta)`` where ``theta`` is the tilt of the fitted bone
  surface against ``n`` (corrects oblique columns on curved plates);
* ``a`` articular surface: the topmost 0.5 crossing of the cartilage indicator.

The site footprint is the set of columns that meet the site mask (closed and hole-filled in
the tangent plane); the native reference ring is the columns ``ring_gap_mm`` to
``ring_gap_mm + ring_width_mm`` outside the footprint that carry cartilage of the same plate.
Every function here is pure: arrays in, numbers out.
"""

from __future__ import annotations

import math
import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import Field
from scipy import ndimage

from pipeline.config import Strict
from pipeline.errors import InputError
from pipeline.io import Geometry
from pipeline.labels import default_scheme

NAN = float("nan")

__all__ = ["MeasurementConfig", "LazyDiameters", "plate_near", "bone_normal", "LocalFrame",
           "Columns", "make_frame", "sample_columns", "column_profiles", "index_crop_getter",
           "footprint_from_samples", "footprint_from_points", "SiteSpec", "site_inputs",
           "sites_from_scan_result", "sites_from_defects_csv",
           "quad_fit", "feret_diameter_mm", "site_measures"]


class MeasurementConfig(Strict):
    """How the quantities are measured (cartiq's own settings, not from the publications).

    Lengths in mm, areas in mm2.  Columns: ``grid_mm`` apart, sampled every ``step_mm`` from
    ``bone_depth_mm`` below to ``max_height_mm`` above the site centre; cartilage counted
    from ``bone_margin_mm`` below to ``max_cart_height_mm`` above the bone surface.  A site
    belongs to the plate with most cartilage within ``plate_search_mm``; its footprint is
    closed by a ``closing_mm`` disc.  Native ring: ``ring_gap_mm`` .. ``+ ring_width_mm``
    outside, columns thicker than ``min_native_thickness_mm``.  Intensity samples need a
    cartilage fraction >= ``interior_fraction``.  ``fill_level_pct``: a fill up to
    ``fill_tolerance_pct`` below a step of ``fill_levels_pct`` counts as reaching it.
    Integration: band +-``border_band_mm``, ``border_sectors`` sectors; a column is a cleft
    when ``cleft_depth_fraction`` of the local level is missing (samples brighter than
    ``fluid_bright_ratio`` x the tissue median count as missing; null disables); a sector
    is clefted when ``cleft_min_sector_fraction`` of its columns are, over at least
    ``cleft_min_mm``.  Surface: ``surface_edge_margin_mm`` from the border excluded,
    irregular when deviating > max(``irregular_min_mm``, ``irregular_fraction`` x native
    thickness), components < ``irregular_min_area_mm2`` dropped.  Bone: the
    ``bone_percentile`` of the deviation.  BML within ``bml_margin_mm`` of the footprint and
    ``subchondral_depth_mm`` below the bone.  Cysts: bone voxels brighter than
    ``cyst_intensity_ratio`` x the median bone intensity (null: not assessed).  The
    ``min_*`` values set the confidence flags (``min_ring_coverage``: share of the ring
    annulus with native cartilage; less means the site is at a plate edge or in a denuded
    area; ``max_spacing_mm``: coarser voxels flag the geometric items).
    """

    grid_mm: float = Field(0.5, gt=0, le=2)
    step_mm: float = Field(0.2, gt=0, le=1)
    max_height_mm: float = Field(10.0, gt=0)
    bone_depth_mm: float = Field(14.0, gt=0)
    max_cart_height_mm: float = Field(8.0, gt=0)
    bone_margin_mm: float = Field(1.0, ge=0)
    plate_search_mm: float = Field(3.0, ge=0)
    max_site_radius_mm: float = Field(25.0, gt=0)
    closing_mm: float = Field(1.5, ge=0)
    ring_gap_mm: float = Field(1.0, ge=0)
    ring_width_mm: float = Field(4.0, gt=0)
    min_native_thickness_mm: float = Field(0.3, ge=0)
    interior_fraction: float = Field(0.9, gt=0, le=1)
    fit_trim_mm: float = Field(0.5, gt=0)
    fill_tolerance_pct: float = Field(2.5, ge=0, le=20)
    fill_levels_pct: list[float] = Field([25.0, 50.0, 75.0, 100.0])
    border_band_mm: float = Field(2.5, gt=0)
    border_sectors: int = Field(36, ge=4, le=360)
    cleft_depth_fraction: float = Field(0.5, gt=0, lt=1)
    cleft_min_mm: float = Field(0.5, gt=0)
    cleft_min_sector_fraction: float = Field(0.1, ge=0, lt=1)
    fluid_bright_ratio: float | None = Field(2.0, gt=1)
    surface_edge_margin_mm: float = Field(1.0, ge=0)
    irregular_min_mm: float = Field(0.5, gt=0)
    irregular_fraction: float = Field(0.25, gt=0)
    irregular_min_area_mm2: float = Field(1.0, ge=0)
    bone_percentile: float = Field(75.0, ge=50, le=100)
    bml_margin_mm: float = Field(2.0, ge=0)
    subchondral_depth_mm: float = Field(10.0, gt=0)
    cyst_intensity_ratio: float | None = Field(None, gt=1)
    cyst_min_voxels: int = Field(5, ge=1)
    min_site_area_mm2: float = Field(10.0, ge=0)
    min_ring_area_mm2: float = Field(20.0, ge=0)
    min_ring_coverage: float = Field(0.5, ge=0, le=1)
    min_native_voxels: float = Field(30.0, ge=0)
    min_repair_voxels: float = Field(10.0, ge=0)
    min_bone_column_fraction: float = Field(0.8, ge=0, le=1)
    max_spacing_mm: float = Field(1.5, gt=0)


@dataclass(frozen=True)
class LocalFrame:
    """Origin (LPS mm) and orthonormal axes of a site's tangent frame."""

    center: np.ndarray
    normal: np.ndarray
    e1: np.ndarray
    e2: np.ndarray


def make_frame(center: np.ndarray, normal: np.ndarray) -> LocalFrame:
    """Tangent frame from a normal; ``e1`` is chosen deterministically from world axes."""
    n = np.asarray(normal, float)
    n = n / np.linalg.norm(n)
    helper = np.eye(3)[int(np.argmin(np.abs(n)))]
    e1 = np.cross(n, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(n, e1)
    return LocalFrame(np.asarray(center, float), n, e1, e2)


@dataclass
class Columns:
    """Samples on a grid of columns: 2D grid shape ``(m, m)``, ``k`` samples per column."""

    frame: LocalFrame
    grid_mm: float
    step_mm: float
    u: np.ndarray            # (m, m) tangent coordinate along e1, mm
    v: np.ndarray            # (m, m) along e2, mm
    w: np.ndarray            # (k,) height along n, mm
    inside: np.ndarray       # (m, m) bool: within the disc of radius R
    samples: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (m, m, k)


def sample_columns(frame: LocalFrame, radius_mm: float, w_range_mm: tuple[float, float],
                   grid_mm: float, step_mm: float,
                   world_to_index: Callable[[np.ndarray], np.ndarray],
                   shape: tuple[int, int, int],
                   arrays: dict[str, tuple[Callable[[tuple[slice, ...]], np.ndarray], int]]
                   ) -> Columns:
    """Sample volumes along the columns of a tangent grid.

    Parameters
    ----------
    frame : the site's local frame.
    radius_mm : radius of the disc of columns.
    w_range_mm : (low, high) heights along the normal, mm.
    grid_mm, step_mm : column spacing and sample step, mm.
    world_to_index : maps (N, 3) LPS mm to continuous voxel indices.
    shape : the volume shape (indices outside read as 0).
    arrays : name -> (crop function returning the array for a tuple of slices, spline order).
        Taking a crop function lets callers build float indicators only for the crop.
    """
    m = 2 * int(math.ceil(radius_mm / grid_mm)) + 1
    ax = (np.arange(m) - m // 2) * grid_mm
    u, v = np.meshgrid(ax, ax, indexing="ij")
    w = np.arange(w_range_mm[0], w_range_mm[1] + 0.5 * step_mm, step_mm)
    pts = (frame.center[None, None, None, :] + u[..., None, None] * frame.e1
           + v[..., None, None] * frame.e2 + w[None, None, :, None] * frame.normal)
    idx = world_to_index(pts.reshape(-1, 3))
    lo = np.clip(np.floor(idx.min(0)).astype(int) - 1, 0, np.asarray(shape) - 1)
    hi = np.clip(np.ceil(idx.max(0)).astype(int) + 2, 1, np.asarray(shape))
    cols = Columns(frame, grid_mm, step_mm, u, v, w, (u ** 2 + v ** 2) <= radius_mm ** 2)
    if np.any(hi <= lo):
        for name in arrays:
            cols.samples[name] = np.zeros((m, m, w.size), np.float32)
        return cols
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    local = (idx - lo).T
    for name, (getter, order) in arrays.items():
        sub = getter(crop)
        vals = ndimage.map_coordinates(sub, local, order=order, mode="constant", cval=0.0,
                                       prefilter=False)
        cols.samples[name] = vals.reshape(m, m, w.size).astype(np.float32)
    return cols


def _top_crossing(frac: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Height of the topmost 0.5 crossing of an indicator along each column (NaN: none)."""
    above = frac >= 0.5
    anyv = above.any(-1)
    k = frac.shape[-1]
    top = k - 1 - np.argmax(above[..., ::-1], axis=-1)
    out = np.full(frac.shape[:-1], np.nan)
    step = w[1] - w[0] if w.size > 1 else 1.0
    ii = np.nonzero(anyv)
    t = top[ii]
    f0 = frac[ii + (t,)]
    nxt = np.minimum(t + 1, k - 1)
    f1 = np.where(t + 1 < k, frac[ii + (nxt,)], 0.0)
    denom = np.where(np.abs(f0 - f1) > 1e-6, f0 - f1, 1.0)
    frac_step = np.clip((f0 - 0.5) / denom, 0.0, 1.0)
    out[ii] = w[t] + frac_step * step
    return out


def column_profiles(cols: Columns, *, bone_margin_mm: float, max_cart_height_mm: float
                    ) -> dict[str, np.ndarray]:
    """Bone surface ``b``, cartilage thickness ``t`` and articular surface ``a`` per column."""
    w = cols.w
    b = _top_crossing(cols.samples["bone"], w)
    b[~cols.inside] = np.nan
    lo = np.where(np.isnan(b), np.inf, b - bone_margin_mm)
    hi = np.where(np.isnan(b), -np.inf, b + max_cart_height_mm)
    band = (w[None, None, :] >= lo[..., None]) & (w[None, None, :] <= hi[..., None])
    cart = cols.samples["cart"] * band
    t = cart.sum(-1) * cols.step_mm
    t[np.isnan(b)] = np.nan
    a = _top_crossing(cart, w)
    # internal gap: non-cartilage run between the bone surface and the articular surface
    solid = (cart >= 0.5) & (w[None, None, :] >= (b + 0.5 * cols.step_mm)[..., None])
    below_a = w[None, None, :] <= np.nan_to_num(a, nan=-np.inf)[..., None]
    gap = (~solid) & below_a & (w[None, None, :] > b[..., None])
    gap_mm = gap.sum(-1) * cols.step_mm
    return {"b": b, "t": t, "a": a, "gap_mm": gap_mm.astype(float)}


def quad_fit(u: np.ndarray, v: np.ndarray, z: np.ndarray, *, trim_mm: float = 0.5,
             iterations: int = 3
            ) -> tuple[np.ndarray, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """Robust least-squares quadratic surface ``z(u, v)``; returns (coefficients, predictor).

    Points farther than ``max(trim_mm, 3 * robust SD)`` from the fit are dropped and the fit
    repeated.  Falls back to a plane (< 12 points) or a constant (< 4 points).
    """
    u, v, z = (np.asarray(x, float).ravel() for x in (u, v, z))
    ok = np.isfinite(z)
    n = int(ok.sum())
    if n == 0:
        return np.zeros(6), lambda uu, vv: np.full(np.shape(uu), np.nan)
    ncoef = 6 if n >= 12 else (3 if n >= 4 else 1)

    def design(uu: np.ndarray, vv: np.ndarray) -> np.ndarray:
        cols = [np.ones_like(uu), uu, vv, uu * uu, uu * vv, vv * vv]
        return np.stack(cols[:ncoef], -1)

    keep = ok.copy()
    coef = np.zeros(ncoef)
    for _ in range(iterations):
        coef, *_ = np.linalg.lstsq(design(u[keep], v[keep]), z[keep], rcond=None)
        res = z - design(u, v) @ coef
        mad = 1.4826 * np.median(np.abs(res[keep]))
        new = ok & (np.abs(res) <= max(trim_mm, 3 * mad))
        if new.sum() < ncoef or np.array_equal(new, keep):
            break
        keep = new
    full = np.zeros(6)
    full[:ncoef] = coef

    def predict(uu: np.ndarray, vv: np.ndarray) -> np.ndarray:
        uu = np.asarray(uu, float)
        vv = np.asarray(vv, float)
        return (full[0] + full[1] * uu + full[2] * vv + full[3] * uu * uu + full[4] * uu * vv
                + full[5] * vv * vv)

    return full, predict


def feret_diameter_mm(points: np.ndarray, extent_mm: float = 0.0) -> float:
    """Largest distance between points (N, d) in mm, plus ``extent_mm`` (a cell or voxel size)."""
    pts = np.asarray(points, float)
    if len(pts) == 0:
        return 0.0
    if len(pts) == 1:
        return float(extent_mm)
    if len(pts) > 400:
        from scipy.spatial import ConvexHull, QhullError

        try:
            pts = pts[ConvexHull(pts).vertices]
        except (QhullError, ValueError):
            pass
    if len(pts) > 3000:
        pts = pts[:: int(math.ceil(len(pts) / 3000))]
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
    return float(d.max()) + float(extent_mm)


def _robust_sd(x: np.ndarray) -> float:
    if x.size < 2:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def _cells_mm(cols: Columns, mask: np.ndarray) -> np.ndarray:
    return np.stack([cols.u[mask], cols.v[mask]], -1)


@dataclass
class _Site:
    """Column masks and reference values shared by the item measurements of one site."""

    cols: Columns
    b: np.ndarray                # bone surface height per column, mm (NaN: no bone)
    a: np.ndarray                # articular surface height, mm
    tc: np.ndarray               # tilt-corrected cartilage thickness, mm
    cos: np.ndarray              # tilt correction
    valid: np.ndarray            # columns with bone
    site: np.ndarray             # the footprint
    site_valid: np.ndarray
    d_in: np.ndarray             # distance into the footprint from its border, mm
    d_out: np.ndarray            # distance outside the footprint, mm
    ring: np.ndarray             # native reference columns
    outer: np.ndarray            # cartilage-covered surroundings (bone fit)
    bfit: Callable[[np.ndarray, np.ndarray], np.ndarray]
    native_mm: float             # median native thickness
    repair_level_mm: float       # median repair thickness inside the site
    diameter_mm: float           # repair (footprint) Feret diameter


def _site(cols: Columns, prof: dict[str, np.ndarray], footprint: np.ndarray, p: Any
          ) -> tuple[_Site, dict[str, Any]]:
    g = cols.grid_mm
    b, t = prof["b"], prof["t"]
    valid = np.isfinite(b) & cols.inside
    site = footprint & cols.inside
    d_out = ndimage.distance_transform_edt(~site) * g
    d_in = ndimage.distance_transform_edt(site) * g
    annulus = (~site) & cols.inside & (d_out > p.ring_gap_mm) & \
        (d_out <= p.ring_gap_mm + p.ring_width_mm)
    ring = annulus & valid & (t >= p.min_native_thickness_mm)
    outer = (~site) & valid & (d_out > p.ring_gap_mm) & (t >= p.min_native_thickness_mm)
    _, bfit = quad_fit(cols.u[outer], cols.v[outer], b[outer], trim_mm=p.fit_trim_mm)
    du = (bfit(cols.u + 0.5 * g, cols.v) - bfit(cols.u - 0.5 * g, cols.v)) / g
    dv = (bfit(cols.u, cols.v + 0.5 * g) - bfit(cols.u, cols.v - 0.5 * g)) / g
    cos = 1.0 / np.sqrt(1.0 + du ** 2 + dv ** 2)
    cos = np.where(np.isfinite(cos), cos, 1.0)
    tc = t * cos
    native = tc[ring]
    site_valid = site & valid
    inner = site_valid & (d_in > p.border_band_mm)
    level = tc[inner] if inner.any() else tc[site_valid]
    s = _Site(cols, b, prof["a"], tc, cos, valid, site, site_valid, d_in, d_out, ring, outer,
              bfit, float(np.median(native)) if native.size else NAN,
              float(np.median(level)) if level.size else NAN,
              feret_diameter_mm(_cells_mm(cols, site), g) if site.any() else 0.0)
    cell = g * g
    ev = {"site_columns": int(site.sum()), "site_columns_with_bone": int(site_valid.sum()),
          "site_area_mm2": float(site.sum() * cell), "ring_columns": int(ring.sum()),
          "ring_area_mm2": float(ring.sum() * cell),
          "ring_coverage": float(ring.sum() / max(1, annulus.sum())),
          "native_thickness_median_mm": s.native_mm,
          "native_thickness_mean_mm": float(native.mean()) if native.size else None,
          "repair_level_mm": s.repair_level_mm, "bone_fit_columns": int(outer.sum())}
    return s, ev


def _fill(s: _Site, p: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """Volume fill: repair thickness over the space between the actual bone surface and the
    native articular surface expected from the ring (so bony overgrowth or a bony defect
    under the site changes the defect's depth, not the fill)."""
    cols = s.cols
    rep_t = s.tc[s.site_valid]
    nat_top = s.ring & np.isfinite(s.a)
    _, natfit = quad_fit(cols.u[nat_top], cols.v[nat_top], s.a[nat_top], trim_mm=p.fit_trim_mm)
    exp_site = (np.clip(natfit(cols.u, cols.v) - s.b, 0.0, None) * s.cos)[s.site_valid]
    total = float(exp_site.sum()) if exp_site.size else NAN
    fill = 100.0 * float(rep_t.sum()) / total if np.isfinite(total) and total > 0 else NAN
    # the published 25% steps: a fill just below a step (within the measurement tolerance)
    # counts as reaching it, one just above 150% as 150%
    level = fill
    for step in p.fill_levels_pct:
        if np.isfinite(fill) and step - p.fill_tolerance_pct <= fill < step:
            level = step
    if np.isfinite(fill) and 150 < fill <= 150 + p.fill_tolerance_pct:
        level = 150.0
    m = {"fill_pct": fill, "fill_level_pct": level,
         "repair_thickness_mm": float(rep_t.mean()) if rep_t.size else NAN,
         "native_thickness_mm": s.native_mm, "repair_diameter_mm": s.diameter_mm,
         "site_area_mm2": float(s.site.sum() * cols.grid_mm ** 2),
         "denuded_pct": (100.0 * float((rep_t < 0.1 * s.native_mm).mean())
                         if rep_t.size and s.native_mm > 0 else NAN)}
    return m, {"expected_defect_depth_mm": float(exp_site.mean()) if exp_site.size else None}


def _intensity(s: _Site, p: Any, prof: dict[str, np.ndarray], img: np.ndarray | None,
               voxel_volume_mm3: float) -> tuple[dict[str, float], dict[str, Any]]:
    """Signal (median ratio) and structure (robust-SD ratio, internal clefts)."""
    cols = s.cols
    base = cols.w[None, None, :] > (s.b - p.bone_margin_mm)[..., None]
    interior = (cols.samples["cart"] >= p.interior_fraction) & base
    rep_i = img[s.site_valid[..., None] & interior] if img is not None else np.array([])
    nat_i = img[s.ring[..., None] & interior] if img is not None else np.array([])
    per_sample = cols.grid_mm ** 2 * cols.step_mm / voxel_volume_mm3
    med_rep = float(np.median(rep_i)) if rep_i.size else NAN
    med_nat = float(np.median(nat_i)) if nat_i.size else NAN
    sd_rep, sd_nat = _robust_sd(rep_i), _robust_sd(nat_i)
    # internal clefts: away from the border (border clefts belong to integration)
    filled = s.site_valid & (s.tc >= p.min_native_thickness_mm) & \
        (s.d_in > p.surface_edge_margin_mm)
    clefted = filled & (prof["gap_mm"] >= p.cleft_min_mm)
    m = {"signal_ratio": med_rep / med_nat if rep_i.size and med_nat > 0 else NAN,
         "heterogeneity_ratio": sd_rep / sd_nat if np.isfinite(sd_rep) and sd_nat > 0 else NAN,
         "internal_cleft_pct": 100.0 * float(clefted.sum() / filled.sum()) if filled.any()
         else 0.0}
    ev = {"repair_voxels": round(float(rep_i.size * per_sample), 1),
          "native_voxels": round(float(nat_i.size * per_sample), 1),
          "repair_intensity_median": med_rep, "native_intensity_median": med_nat,
          "repair_intensity_sd": sd_rep, "native_intensity_sd": sd_nat}
    return m, ev


def _integration(s: _Site, p: Any, img: np.ndarray | None, ref_intensity: float
                 ) -> tuple[dict[str, float], dict[str, Any]]:
    """Clefts along the border: per angular sector, a dip of the cartilage in a band around
    the border below both the repair level and the sector's native level beyond the band."""
    cols, g = s.cols, s.cols.grid_mm
    sd = np.where(s.site, -s.d_in, s.d_out)
    band = s.valid & (np.abs(sd) <= p.border_band_mm)
    beyond = s.valid & (sd > p.border_band_mm) & (sd <= p.border_band_mm + p.ring_width_mm)
    eff_t = s.tc.copy()          # thickness with fluid-bright samples counted as missing
    if p.fluid_bright_ratio is not None and img is not None and np.isfinite(ref_intensity):
        cart = cols.samples["cart"]
        base = cols.w[None, None, :] > (s.b - p.bone_margin_mm)[..., None]
        bright = (cart >= 0.5) & base & (img > p.fluid_bright_ratio * ref_intensity)
        eff_t = eff_t - (bright * cart).sum(-1) * cols.step_mm * s.cos
    cu, cv = _cells_mm(cols, s.site).mean(0) if s.site.any() else (0.0, 0.0)
    ang = np.arctan2(cols.v - cv, cols.u - cu)
    rad = np.hypot(cols.u - cu, cols.v - cv)
    sector = ((ang + np.pi) / (2 * np.pi) * p.border_sectors).astype(int) % p.border_sectors
    affected, widths, present = 0, [], 0
    for k in range(p.border_sectors):
        in_s, out_s = band & (sector == k), beyond & (sector == k)
        if not in_s.any() or not out_s.any() or not np.isfinite(s.repair_level_mm):
            continue
        native_s = float(np.median(s.tc[out_s]))
        if native_s < p.min_native_thickness_mm:
            continue                     # no native cartilage beside this part of the border
        present += 1
        gs = in_s & (eff_t < (1.0 - p.cleft_depth_fraction) * min(native_s, s.repair_level_mm))
        if gs.sum() < max(1, p.cleft_min_sector_fraction * in_s.sum()):
            continue
        width = float(rad[gs].max() - rad[gs].min() + g)
        if width >= p.cleft_min_mm:
            affected += 1
            widths.append(width)
    m = {"cleft_border_pct": 100.0 * affected / present if present else NAN,
         "cleft_width_mm": max(widths) if widths else 0.0}
    return m, {"border_sectors_assessed": present}


def _surface(s: _Site, p: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """Irregularity of the repair surface against a robust quadratic fit to itself."""
    cols, g = s.cols, s.cols.grid_mm
    a = s.a
    core = s.site_valid & (s.d_in > p.surface_edge_margin_mm) & np.isfinite(a) & (s.tc > 0)
    if core.sum() < 4:           # small site: use its edge columns too
        core = s.site_valid & np.isfinite(a) & (s.tc > 0)
    exp_t = s.native_mm
    thr = max(p.irregular_min_mm, p.irregular_fraction * exp_t if np.isfinite(exp_t) else 0.0)
    ev = {"surface_threshold_mm": thr, "surface_columns": int(core.sum())}
    if core.sum() < 4:
        return {"irregular_extent_pct": NAN, "irregular_depth_pct": NAN}, ev
    _, afit = quad_fit(cols.u[core], cols.v[core], a[core], trim_mm=thr)
    res = np.where(core, a - afit(cols.u, cols.v), 0.0)
    irr = core & (np.abs(res) > thr)
    level = min(exp_t, s.repair_level_mm)
    if np.isfinite(level) and level > 0:   # holes in the repair count as irregular
        irr |= s.site_valid & (s.d_in > p.surface_edge_margin_mm) & (s.tc < 0.25 * level)
    lab, nlab = ndimage.label(irr, structure=np.ones((3, 3)))
    keep = irr
    if nlab:
        sizes = ndimage.sum(irr, lab, index=np.arange(1, nlab + 1)) * g * g
        keep = np.isin(lab, 1 + np.flatnonzero(sizes >= p.irregular_min_area_mm2))
    ext = feret_diameter_mm(_cells_mm(cols, keep), g) if keep.any() else 0.0
    depth = float(np.abs(res[keep]).max()) if keep.any() else 0.0
    return {"irregular_extent_pct": 100.0 * ext / s.diameter_mm if s.diameter_mm > 0 else NAN,
            "irregular_depth_pct": (100.0 * depth / s.repair_level_mm
                                    if s.repair_level_mm > 0 else NAN)}, ev


def _bone(s: _Site, p: Any) -> dict[str, float]:
    """Bone surface under the site against the fit of the covered surroundings."""
    dev = (s.b - s.bfit(s.cols.u, s.cols.v))[s.site_valid]
    if not dev.size:
        return {k: NAN for k in ("bone_defect_mm", "bone_overgrowth_mm", "bone_deviation_mm",
                                 "bone_defect_ratio", "bone_overgrowth_ratio")}
    depth = max(0.0, -float(np.percentile(dev, 100 - p.bone_percentile)))
    over = max(0.0, float(np.percentile(dev, p.bone_percentile)))
    e = s.native_mm
    return {"bone_defect_mm": depth, "bone_overgrowth_mm": over,
            "bone_deviation_mm": over if over >= depth else -depth,
            "bone_defect_ratio": depth / e if e > 0 else NAN,
            "bone_overgrowth_ratio": over / e if e > 0 else NAN}


def _subchondral(s: _Site, p: Any, diameters: dict[str, Any]
                 ) -> tuple[dict[str, float], dict[str, Any]]:
    """BML (and cyst) components reached below the bone surface under or beside the site."""
    cols = s.cols
    zone = s.valid & (np.where(s.site, -s.d_in, s.d_out) <= p.bml_margin_mm)
    w = cols.w[None, None, :]
    below = (w <= s.b[..., None]) & (w >= (s.b - p.subchondral_depth_mm)[..., None])

    def hit(name: str) -> set[int]:
        comp = cols.samples.get(f"{name}_cc")
        if comp is None:
            return set()
        return {int(i) for i in np.unique(comp[zone[..., None] & below]) if i > 0}

    ids = hit("bml")
    bml = max((diameters.get("bml", {}).get(i, 0.0) for i in ids), default=0.0)
    m = {"bml_diameter_mm": bml,
         "bml_diameter_pct": 100.0 * bml / s.diameter_mm if s.diameter_mm > 0 else NAN,
         "cyst_diameter_mm": (max((diameters["cyst"].get(i, 0.0) for i in hit("cyst")),
                                  default=0.0)
                              if "cyst_cc" in cols.samples and "cyst" in diameters else NAN)}
    return m, {"bml_components": sorted(ids)}


def site_measures(cols: Columns, prof: dict[str, np.ndarray], footprint: np.ndarray,
                  p: Any, *, has_image: bool, diameters: dict[str, Any],
                  voxel_volume_mm3: float) -> tuple[dict[str, float], dict[str, Any]]:
    """All measured quantities of one site.

    Parameters
    ----------
    cols, prof : sampled columns and their profiles (:func:`column_profiles`).
    footprint : (m, m) bool, the site's columns.
    p : the measurement settings (:class:`MeasurementConfig`).
    has_image : whether the intensity samples ``"image"`` are meaningful.
    diameters : ``{"bml": {component id: max diameter mm}, "cyst": {...}}``; components are
        sampled as ``"bml_cc"`` / ``"cyst_cc"``.
    voxel_volume_mm3 : to convert sampled volumes to voxel counts.

    Returns
    -------
    measures : name -> value (NaN when not measurable); the names are what the scoring
        config's category conditions refer to.
    evidence : ROI sizes, reference values, confidence inputs.
    """
    s, ev = _site(cols, prof, footprint, p)
    img = cols.samples.get("image") if has_image else None
    m, e = _fill(s, p)
    ev.update(e)
    mi, e = _intensity(s, p, prof, img, voxel_volume_mm3)
    m.update(mi)
    ev.update(e)
    ref = np.nanmax([e["native_intensity_median"], e["repair_intensity_median"]]) \
        if np.isfinite(e["native_intensity_median"]) else NAN
    for part in (_integration(s, p, img, ref), _surface(s, p), (_bone(s, p), {}),
                 _subchondral(s, p, diameters)):
        m.update(part[0])
        ev.update(part[1])
    return m, ev


class LazyDiameters:
    """Component id -> maximum diameter (mm), computed on first use."""

    def __init__(self, cc: np.ndarray, geometry: Geometry) -> None:
        self.cc, self.geometry = cc, geometry
        self.boxes = ndimage.find_objects(cc)
        self.cache: dict[int, float] = {}
        self.owners: dict[int, list[int]] = {}

    def get(self, i: int, default: float = 0.0) -> float:
        if i in self.cache:
            return self.cache[i]
        if i < 1 or i > len(self.boxes) or self.boxes[i - 1] is None:
            return default
        box = self.boxes[i - 1]
        idx = np.argwhere(self.cc[box] == i) + np.array([s.start for s in box])
        pts = self.geometry.index_to_world(idx)
        self.cache[i] = feret_diameter_mm(pts, float(np.mean(self.geometry.spacing)))
        return self.cache[i]

    def in_bone(self, labels: np.ndarray, bone_value: int) -> list[int]:
        """Components whose 1-voxel shell touches ``bone_value`` more than any other label."""
        if bone_value in self.owners:
            return self.owners[bone_value]
        out: list[int] = []
        self.owners[bone_value] = out
        for i, box in enumerate(self.boxes, start=1):
            if box is None:
                continue
            big = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
            comp = self.cc[big] == i
            shell = ndimage.binary_dilation(comp) & ~comp
            vals, counts = np.unique(labels[big][shell], return_counts=True)
            keep = vals != 0
            if keep.any() and vals[keep][np.argmax(counts[keep])] == bone_value:
                out.append(i)
        return out

    def only(self, ids: list[int]) -> dict[int, float]:
        """Diameters of the given components (a plain dict)."""
        return {i: self.get(i) for i in ids}


def plate_near(labels: np.ndarray, geom: Geometry, idx: np.ndarray, search_mm: float
               ) -> str | None:
    """The cartilage plate of a site (voxel indices ``idx``): the plate label most present
    inside the site, else the one with most voxels within ``search_mm`` of it."""
    scheme = default_scheme()
    margin = np.ceil(search_mm / np.asarray(geom.spacing)).astype(int) + 1
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, labels.shape)
    sub = labels[tuple(slice(a, b) for a, b in zip(lo, hi))]
    mask = np.zeros(sub.shape, bool)
    mask[tuple((idx - lo).T)] = True
    inside = {p: int((sub[mask] == scheme[p]).sum()) for p in scheme.plates}
    if max(inside.values()) >= 3:       # the site covers cartilage (repair tissue): its plate
        return max(inside, key=inside.get)
    near = ndimage.distance_transform_edt(~mask, sampling=geom.spacing) <= search_mm
    counts = {p: int(((sub == scheme[p]) & near).sum()) for p in scheme.plates}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else None


def bone_normal(labels: np.ndarray, geom: Geometry, c: np.ndarray, radius: float,
                bone_vals: list[int], plate_val: int, sigma_mm: float = 2.0) -> np.ndarray | None:
    """Unit normal of the bone surface near ``c`` (LPS), pointing out of the bone.

    Minus the gradient, at ``c``, of the bone indicator smoothed with a Gaussian of
    ``sigma_mm`` (central differences at world offsets, so independent of the file's axis
    order).  Far from any bone (flat field) it falls back to the direction from the bone's
    to the plate's cartilage centroid within ``radius``.
    """
    sp = np.asarray(geom.spacing)
    sigma = max(sigma_mm, 1.5 * float(sp.max()))
    ci = geom.world_to_index(c)[0]
    r = np.ceil((4 * sigma + 2.0) / sp).astype(int) + 1
    lo = np.maximum(np.floor(ci).astype(int) - r, 0)
    hi = np.minimum(np.ceil(ci).astype(int) + r + 1, labels.shape)
    if np.any(hi <= lo):
        return None
    sub = np.isin(labels[tuple(slice(a, b) for a, b in zip(lo, hi))], bone_vals)
    if sub.any():
        sm = ndimage.gaussian_filter(sub.astype(np.float32), sigma / sp, mode="nearest")
        h = 0.5
        offs = np.concatenate([np.eye(3) * h, -np.eye(3) * h]) + c
        f = ndimage.map_coordinates(sm, (geom.world_to_index(offs) - lo).T, order=1,
                                    mode="nearest")
        grad = (f[:3] - f[3:]) / (2 * h)
        if np.linalg.norm(grad) > 1e-3:
            return -grad / np.linalg.norm(grad)
    return _centroid_normal(labels, geom, c, radius, bone_vals, plate_val)


def _centroid_normal(labels: np.ndarray, geom: Geometry, c: np.ndarray, radius: float,
                     bone_vals: list[int], plate_val: int) -> np.ndarray | None:
    ci = geom.world_to_index(c)[0]
    step = np.maximum(1, np.ceil(2 * radius / np.asarray(geom.spacing) / 48)).astype(int)
    r = np.ceil(radius / np.asarray(geom.spacing)).astype(int) + 1
    lo = np.maximum(np.floor(ci).astype(int) - r, 0)
    hi = np.minimum(np.ceil(ci).astype(int) + r + 1, labels.shape)
    if np.any(hi <= lo):
        return None
    ax = [np.arange(a, b, s) for a, b, s in zip(lo, hi, step)]
    sub = labels[np.ix_(*ax)]
    grid = np.stack(np.meshgrid(*ax, indexing="ij"), -1)
    world = geom.index_to_world(grid.reshape(-1, 3)).reshape(grid.shape)
    ball = ((world - c) ** 2).sum(-1) <= radius ** 2
    bone = ball & np.isin(sub, bone_vals)
    cart = ball & (sub == plate_val)
    if bone.sum() < 3 or cart.sum() < 3:
        return None
    n = world[cart].mean(0) - world[bone].mean(0)
    nn = np.linalg.norm(n)
    return n / nn if nn > 0 else None


def index_crop_getter(idx: np.ndarray) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """Crop function for :func:`sample_columns` from voxel indices (N, 3) of a mask."""
    def crop(sl: tuple[slice, ...]) -> np.ndarray:
        sub = np.zeros(tuple(s.stop - s.start for s in sl), np.float32)
        loc = idx - np.array([s.start for s in sl])
        ok = np.all((loc >= 0) & (loc < sub.shape), axis=1)
        sub[tuple(loc[ok].T)] = 1.0
        return sub
    return crop


def footprint_from_samples(cols: Columns, closing_mm: float) -> np.ndarray:
    """Columns meeting the sampled site mask, closed by a disc and hole-filled."""
    return close_footprint((cols.samples["site"] > 0.5).any(-1) & cols.inside, cols, closing_mm)


def close_footprint(foot: np.ndarray, cols: Columns, closing_mm: float) -> np.ndarray:
    """Binary closing by a disc of radius ``closing_mm`` and hole filling, in the grid."""
    if closing_mm > 0:
        k = int(round(closing_mm / cols.grid_mm))
        yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
        closed = ndimage.binary_closing(np.pad(foot, k + 1), (xx ** 2 + yy ** 2) <= k * k)
        foot |= closed[k + 1:-k - 1, k + 1:-k - 1]
    return ndimage.binary_fill_holes(foot) & cols.inside


def footprint_from_points(cols: Columns, pts_world: np.ndarray, radius_mm: float,
                          closing_mm: float = 0.0) -> np.ndarray:
    """Columns within ``radius_mm`` (tangent plane) of any of the points, closed."""
    rel = np.atleast_2d(pts_world) - cols.frame.center
    pu, pv = rel @ cols.frame.e1, rel @ cols.frame.e2
    d2 = (cols.u[..., None] - pu) ** 2 + (cols.v[..., None] - pv) ** 2
    foot = (d2.min(-1) <= max(radius_mm, cols.grid_mm / math.sqrt(2)) ** 2) & cols.inside
    return close_footprint(foot, cols, closing_mm)


# ----------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class SiteSpec:
    """A site given by LPS points (bone-surface vertices or one centre) and a radius in mm.

    The footprint is every column within ``radius_mm`` (in the tangent plane) of a point.
    ``plate`` (a cartilage plate name) skips the plate search when known; ``info`` (e.g.
    the defect's region, kind, area) is copied into the site's evidence.
    """

    site_id: int
    points_world: np.ndarray
    radius_mm: float
    plate: str | None = None
    source: str = "points"
    info: dict[str, Any] | None = None


def site_inputs(sites: Any, shape: tuple[int, ...]) -> list[tuple[int, Any]]:
    """Normalise the accepted site inputs to (site_id, index array (N,3) | SiteSpec)."""
    if sites is None:
        return []
    if isinstance(sites, np.ndarray):
        if tuple(sites.shape) != tuple(shape):
            raise InputError(f"site array shape {sites.shape} differs from the scan {shape}")
        ids = [int(i) for i in np.unique(sites) if i > 0]
        return [(i, np.argwhere(sites == i)) for i in ids]
    out: list[tuple[int, Any]] = []
    for k, s in enumerate(sites, start=1):
        if isinstance(s, SiteSpec):
            out.append((s.site_id, s))
        else:
            arr = np.asarray(s)
            if tuple(arr.shape) != tuple(shape):
                raise InputError(f"site mask {k} shape {arr.shape} differs from the scan {shape}")
            out.append((k, np.argwhere(arr > 0)))
    return out


def sites_from_scan_result(scan_result: Any) -> list[SiteSpec]:
    """One :class:`SiteSpec` per defect: its bone-surface vertices (``defect_id``), each
    covering a disc of 0.75 x the median vertex spacing."""
    from scipy.spatial import cKDTree

    specs = []
    for d in getattr(scan_result, "defects", []):
        pr = scan_result.plates.get(d.plate)
        if pr is None or len(pr.points_world) < 2:
            continue
        sel = np.asarray(pr.defect_id) == d.id
        if sel.any():
            pts = np.asarray(pr.points_world)
            spacing = float(np.median(cKDTree(pts).query(pts[sel], k=2)[0][:, 1]))
            specs.append(SiteSpec(int(d.id), pts[sel], max(0.75 * spacing, 0.25),
                                  plate=d.plate, source="defect"))
    return specs


def sites_from_defects_csv(path: Path) -> list[SiteSpec]:
    """One :class:`SiteSpec` per row of a ``defects.csv``: a disc of the defect's area."""
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
        return [SiteSpec(int(r["defect_id"]),
                         np.array([[float(r["centroid_x_mm"]), float(r["centroid_y_mm"]),
                                    float(r["centroid_z_mm"])]]),
                         math.sqrt(max(float(r["area_mm2"]), 0.0) / math.pi),
                         plate=r.get("plate") or None, source="defect",
                         info={"region": r.get("region"), "kind": r.get("kind"),
                               "area_mm2": float(r["area_mm2"]),
                               "depth_pct": float(r.get("depth_pct") or "nan")}) for r in rows]
    except (KeyError, ValueError) as exc:
        raise InputError(f"malformed defects table ({exc})", path) from None
