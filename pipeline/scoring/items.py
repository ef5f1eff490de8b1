"""MOCART-like item measurements of one repair site, from the columns of
:mod:`cartiq.scoring.columns` (see there for the method); the configuration of the measured
quantities (:class:`MeasurementConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from pydantic import Field
from scipy import ndimage

from cartiq.config import Strict
from cartiq.scoring.columns import Columns, cells_mm, feret_diameter_mm, quad_fit, robust_sd

NAN = float("nan")

__all__ = ["MeasurementConfig", "site_measures"]


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
              feret_diameter_mm(cells_mm(cols, site), g) if site.any() else 0.0)
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
    sd_rep, sd_nat = robust_sd(rep_i), robust_sd(nat_i)
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
    cu, cv = cells_mm(cols, s.site).mean(0) if s.site.any() else (0.0, 0.0)
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
    ext = feret_diameter_mm(cells_mm(cols, keep), g) if keep.any() else 0.0
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
