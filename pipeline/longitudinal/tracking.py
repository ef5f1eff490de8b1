"""Correspondence between two visits of one knee: per-vertex thickness change, defects, BMLs.

Everything here works in **baseline space**: follow-up points are mapped with the rigid
transform of their bone (:mod:`cartiq.longitudinal.register`) and compared at the same places.

Per-vertex thickness change
    Each baseline subchondral-surface vertex takes the follow-up vertex nearest to it after
    registration; the pair is *matched* when they lie within ``max_match_distance_mm``.
    ``change = followup - baseline`` thickness (denuded points have thickness 0, so a filled
    defect shows as thickening).  The *smoothed* change is a Gaussian-weighted (sigma
    ``change_smoothing_mm``), area-weighted average of the matched neighbours' changes; it
    reduces per-vertex segmentation noise before thinning and thickening are separated.

Thinning and thickening (location-independent change)
    Over the matched area A of a plate or subregion, with vertex areas a_i and smoothed
    changes c_i: ``thinning = sum(a_i * min(c_i, 0)) / A`` (mm, <= 0) and
    ``thickening = sum(a_i * max(c_i, 0)) / A`` (mm, >= 0).  Their sum is the mean change at
    matched places; reporting them apart keeps thickening in one place from hiding thinning
    in another (cf. the subregional "ordered values" thinning/thickening scores of Buck,
    Eckstein et al., Arthritis Rheum 2009 - there summed over subregions, here over the
    surface; citation details not verified here).

Defects
    A baseline defect's site is its set of baseline vertices.  At follow-up each site vertex
    looks up its matched follow-up vertex: ``fraction_filled`` is the area share of the site
    no longer in any defect (full or partial), ``fraction_still_full`` the share still
    denuded.  Follow-up defects touching the site are its successors (their area is "area
    then"); follow-up defects touching no baseline defect are *new*.

Bone-marrow lesions
    Follow-up lesion masks are resampled into the baseline grid with their bone's transform
    (nearest neighbour).  Lesions overlapping, or with centroids within
    ``lesion_match_distance_mm``, are matched; unmatched baseline lesions are *resolved*,
    unmatched follow-up lesions *new*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import dataclasses

import numpy as np
from pydantic import Field
from scipy import sparse
from scipy.spatial import cKDTree

from cartiq.config import Strict
from cartiq.io.volume import Geometry, Volume
from cartiq.io.labels import default_scheme
from cartiq.measurement.regions import region_parents
from cartiq.longitudinal.register import BoneRegistration

__all__ = ["MatchingConfig", "PlateMatch", "match_plate", "change_summary", "region_select",
           "carry_regions", "track_defects", "track_lesions", "score_defect_sites", "DEFECT_TRACKING_COLUMNS", "LESION_TRACKING_COLUMNS"]


class MatchingConfig(Strict):
    max_match_distance_mm: float = Field(2.0, gt=0,
        description="baseline and follow-up vertices farther apart are not the same place")
    change_smoothing_mm: float = Field(1.5, ge=0,
        description="Gaussian sigma of the smoothed per-vertex change (0: none)")
    min_matched_fraction: float = Field(0.5, gt=0, le=1,
        description="a defect site with less of its area matched gets no follow-up values")
    lesion_match_distance_mm: float = Field(5.0, ge=0,
        description="non-overlapping lesions still match when their centroids are this close")
    filled_fraction: float = Field(0.9, gt=0, le=1,
        description="a defect site at least this filled is 'filled'")


@dataclass
class PlateMatch:
    """Baseline-vertex correspondence of one plate (arrays over baseline vertices)."""

    plate: str
    followup_index: np.ndarray  # (Nb,) nearest follow-up vertex, -1 when unmatched
    matched: np.ndarray  # (Nb,) bool
    thickness_baseline_mm: np.ndarray  # (Nb,)
    thickness_followup_mm: np.ndarray  # (Nb,) nan when unmatched
    change_mm: np.ndarray  # (Nb,) nan when unmatched or unmeasured
    change_smoothed_mm: np.ndarray  # (Nb,)
    followup_to_baseline: np.ndarray  # (Nf,) nearest baseline vertex of each follow-up vertex
    followup_distance_mm: np.ndarray  # (Nf,)


def match_plate(baseline, followup, registration: BoneRegistration,
                config: MatchingConfig = MatchingConfig()) -> PlateMatch:
    """Correspond a plate's surface vertices across visits (both ``PlateResult``)."""
    pts_f = registration.map_points(followup.points_world)
    pts_b = baseline.points_world
    tree_f = cKDTree(pts_f)
    dist, idx = tree_f.query(pts_b, workers=-1)
    matched = dist <= config.max_match_distance_mm
    tb = np.where(baseline.denuded, 0.0, baseline.thickness_mm)
    tf_all = np.where(followup.denuded, 0.0, followup.thickness_mm)
    tf = np.where(matched, tf_all[idx], np.nan)
    change = tf - tb
    smooth = _smooth(pts_b, change, baseline.vertex_area_mm2, config.change_smoothing_mm)
    d_fb, i_fb = cKDTree(pts_b).query(pts_f, workers=-1)
    return PlateMatch(plate=baseline.name, followup_index=np.where(matched, idx, -1),
                      matched=matched, thickness_baseline_mm=tb, thickness_followup_mm=tf,
                      change_mm=change, change_smoothed_mm=smooth,
                      followup_to_baseline=i_fb, followup_distance_mm=d_fb)


def _smooth(points: np.ndarray, values: np.ndarray, areas: np.ndarray, sigma: float) -> np.ndarray:
    ok = np.isfinite(values)
    if sigma <= 0 or not ok.any():
        return values.copy()
    tree = cKDTree(points)
    d = tree.sparse_distance_matrix(tree, 3.0 * sigma, output_type="coo_matrix")
    off = d.row != d.col
    rows = np.concatenate([d.row[off], np.arange(len(points))])
    cols = np.concatenate([d.col[off], np.arange(len(points))])
    dist = np.concatenate([d.data[off], np.zeros(len(points))])
    w = sparse.csr_matrix((np.exp(-0.5 * (dist / sigma) ** 2), (rows, cols)),
                          shape=(len(points), len(points)))
    wa = np.where(ok, areas, 0.0)
    num = w @ (wa * np.nan_to_num(values))
    den = w @ wa
    out = np.full(len(values), np.nan)
    good = den > 0
    out[good] = num[good] / den[good]
    out[~ok] = np.nan  # unmatched places stay unmatched
    return out


def change_summary(match: PlateMatch, areas: np.ndarray, select: np.ndarray) -> dict[str, float]:
    """Thickness at matched places and thinning/thickening over ``select`` (bool per vertex).

    Returns keys ``baseline``, ``followup``, ``change`` (area-weighted mean thickness at
    matched, measured places, mm), ``thinning``, ``thickening`` (mm), ``matched_pct``.
    """
    ok = select & np.isfinite(match.change_mm) & np.isfinite(match.thickness_baseline_mm)
    total = float(areas[select].sum())
    nan = float("nan")
    if not ok.any():
        return {"baseline": nan, "followup": nan, "change": nan, "thinning": nan,
                "thickening": nan, "matched_pct": 0.0 if total > 0 else nan}
    a = areas[ok]
    s = np.nan_to_num(match.change_smoothed_mm[ok])
    aw = float(a.sum())
    return {
        "baseline": float(np.average(match.thickness_baseline_mm[ok], weights=a)),
        "followup": float(np.average(match.thickness_followup_mm[ok], weights=a)),
        "change": float(np.average(match.change_mm[ok], weights=a)),
        "thinning": float((a * np.minimum(s, 0.0)).sum() / aw),
        "thickening": float((a * np.maximum(s, 0.0)).sum() / aw),
        "matched_pct": 100.0 * aw / total if total > 0 else nan,
    }


def region_select(codes: np.ndarray, region: str) -> np.ndarray:
    """Vertices in ``region`` ('all', a subregion code, or a parent such as ``cMF``)."""
    if region == "all":
        return np.ones(len(codes), dtype=bool)
    return np.array([c == region or region in region_parents(c) for c in codes], dtype=bool)


def carry_regions(bl, fu, fu_labels: Volume, matches: dict[str, PlateMatch],
                   max_mm: float) -> tuple[list[dict[str, Any]], set[str]]:
    """Follow-up measurement rows with the baseline's subregions carried over.

    Each follow-up vertex takes the region of its nearest baseline vertex (after
    registration); cartilage voxels take the region of their nearest follow-up vertex (for
    regional volumes); defects take their vertices' most common carried region.  Returns
    the rows (as :func:`cartiq.measurement.measure.measure_labels` makes them) and the plates done.
    """
    from cartiq.measurement.measure import plate_rows  # same statistics as the measurement stage

    scheme = default_scheme()
    defects = list(fu.defects)
    carried_plates, rows = set(), []
    for name, pf in fu.plates.items():
        m = matches.get(name)
        if m is None or not pf.present:
            continue
        pb = bl.plates[name]
        codes = pb.region[m.followup_to_baseline].astype(object)
        codes[m.followup_distance_mm > max_mm * 5] = ""
        vox = np.argwhere(fu_labels.array == scheme[name])
        volume: dict[str, float] = {}
        if len(vox):
            _, near = cKDTree(pf.points_world).query(fu_labels.geometry.index_to_world(vox), workers=-1)
            vals, counts = np.unique(codes[near].astype(str), return_counts=True)
            for code, n in zip(vals, counts):
                for r in [code] + region_parents(code):
                    if r:
                        volume[r] = volume.get(r, 0.0) + n * fu_labels.geometry.voxel_volume_mm3
        for i, d in enumerate(defects):
            if d.plate == name:
                sel = codes[pf.defect_id == d.id]
                sel = [c for c in sel if c]
                region = max(set(sel), key=sel.count) if sel else "all"
                defects[i] = dataclasses.replace(d, region=region)
        rows += plate_rows(dataclasses.replace(pf, region=codes, region_volume_mm3=volume),
                            [d for d in defects if d.plate == name])
        carried_plates.add(name)
    return rows, carried_plates


# ----------------------------------------------------------------------------- defects

DEFECT_TRACKING_COLUMNS = [
    "status", "baseline_defect_id", "plate", "region", "baseline_kind", "baseline_area_mm2",
    "followup_defect_ids", "followup_kind", "followup_area_mm2", "area_change_mm2",
    "area_change_pct", "fraction_filled", "fraction_still_full",
    "site_thickness_baseline_mm", "site_thickness_followup_mm", "matched_pct", "note"]


def track_defects(bl_result, fu_result, matches: dict[str, PlateMatch],
                  registrations: dict[str, BoneRegistration],
                  config: MatchingConfig = MatchingConfig(),
                  area_sdc: Callable[[float], float] = lambda a: 0.0) -> list[dict[str, Any]]:
    """One row per baseline defect (its fate) plus one per new follow-up defect.

    ``status``: ``filled`` (at least ``filled_fraction`` of the site no longer a defect),
    else ``enlarged``/``reduced`` when the follow-up area differs from the baseline area by
    more than ``area_sdc(baseline_area)`` mm2, else ``stable``; ``new`` for new defects,
    ``not compared`` (with a note) when the site cannot be followed.
    """
    rows: list[dict[str, Any]] = []
    fu_by_id = {d.id: d for d in fu_result.defects}
    claimed: set[int] = set()
    for d in bl_result.defects:
        pb = bl_result.plates[d.plate]
        pf = fu_result.plates.get(d.plate)
        reg = registrations.get(pb.bone)
        row: dict[str, Any] = {"baseline_defect_id": d.id, "plate": d.plate, "region": d.region,
                               "baseline_kind": d.kind, "baseline_area_mm2": d.area_mm2}
        m = matches.get(d.plate)
        site = pb.defect_id == d.id
        a = pb.vertex_area_mm2[site]
        row["site_thickness_baseline_mm"] = float(np.average(
            np.where(pb.denuded[site], 0.0, pb.thickness_mm[site]), weights=a))
        if pf is None or not pf.present:
            rows.append({**row, "status": "not compared", "note": f"{d.plate} missing at follow-up"})
            continue
        if m is None or reg is None or not reg.converged:
            rows.append({**row, "status": "not compared",
                         "note": f"{pb.bone} registration did not converge"})
            continue
        idx = m.followup_index[site]
        ok = idx >= 0
        matched_pct = 100.0 * float(a[ok].sum()) / float(a.sum())
        row["matched_pct"] = matched_pct
        if matched_pct < 100.0 * config.min_matched_fraction:
            rows.append({**row, "status": "not compared",
                         "note": "defect site lies outside the follow-up plate surface"})
            continue
        fid = pf.defect_id[idx[ok]]
        aok = a[ok]
        in_defect = fid > 0
        still_full = pf.denuded[idx[ok]]
        successors = sorted({int(i) for i in fid[in_defect]})
        claimed.update(successors)
        f_area = sum(fu_by_id[i].area_mm2 for i in successors if i in fu_by_id)
        kinds = sorted({fu_by_id[i].kind for i in successors if i in fu_by_id})
        filled = 1.0 - float(aok[in_defect].sum()) / float(aok.sum())
        tf = np.where(pf.denuded, 0.0, pf.thickness_mm)[idx[ok]]
        fin = np.isfinite(tf)
        row.update({
            "followup_defect_ids": ";".join(str(i) for i in successors),
            "followup_kind": ";".join(kinds) if kinds else "none",
            "followup_area_mm2": f_area,
            "area_change_mm2": f_area - d.area_mm2,
            "area_change_pct": 100.0 * (f_area - d.area_mm2) / d.area_mm2 if d.area_mm2 > 0 else np.nan,
            "fraction_filled": filled,
            "fraction_still_full": float(aok[still_full].sum()) / float(aok.sum()),
            "site_thickness_followup_mm": float(np.average(tf[fin], weights=aok[fin])) if fin.any() else np.nan,
            "status": ("filled" if filled >= config.filled_fraction else
                       "enlarged" if f_area - d.area_mm2 > area_sdc(d.area_mm2) else
                       "reduced" if d.area_mm2 - f_area > area_sdc(d.area_mm2) else "stable"),
        })
        rows.append(row)
    for d in fu_result.defects:
        if d.id in claimed:
            continue
        m = matches.get(d.plate)
        pf = fu_result.plates[d.plate]
        reg = registrations.get(pf.bone)
        if m is None or reg is None or not reg.converged:
            continue
        site = pf.defect_id == d.id
        bl_ids = bl_result.plates[d.plate].defect_id[m.followup_to_baseline[site]]
        near = m.followup_distance_mm[site] <= config.max_match_distance_mm
        if (bl_ids[near] > 0).any():
            continue  # overlaps a baseline defect that mapped elsewhere: not new
        rows.append({"status": "new", "plate": d.plate, "region": d.region,
                     "followup_defect_ids": str(d.id), "followup_kind": d.kind,
                     "followup_area_mm2": d.area_mm2, "baseline_area_mm2": 0.0,
                     "area_change_mm2": d.area_mm2})
    return rows


# ----------------------------------------------------------------------------- lesions

LESION_TRACKING_COLUMNS = [
    "status", "bone", "region", "baseline_lesion_ids", "followup_lesion_ids",
    "baseline_volume_mm3", "followup_volume_mm3", "volume_change_mm3", "volume_change_pct",
    "baseline_max_slice_area_mm2", "followup_max_slice_area_mm2", "area_change_mm2",
    "baseline_max_diameter_mm", "followup_max_diameter_mm", "centroid_shift_mm", "note"]


def _lesion_id_map(lesions, shape) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint16)
    for les in lesions:
        out[tuple(np.asarray(les.mask_index).T)] = les.id
    return out


def track_lesions(bl_result, fu_result, bl_geometry: Geometry, fu_geometry: Geometry,
                  registrations: dict[str, BoneRegistration],
                  config: MatchingConfig = MatchingConfig()) -> list[dict[str, Any]]:
    """Match BMLs across visits (groups of overlapping lesions form one row)."""
    import SimpleITK as sitk

    from cartiq.longitudinal.register import to_sitk_image

    rows: list[dict[str, Any]] = []
    for bone in sorted({l.bone for l in bl_result.lesions} | {l.bone for l in fu_result.lesions}):
        bls = [l for l in bl_result.lesions if l.bone == bone]
        fus = [l for l in fu_result.lesions if l.bone == bone]
        reg = registrations.get(bone)
        if reg is None or not reg.present or not reg.converged:
            note = f"{bone} registration did not converge" if reg is not None and reg.present \
                else f"{bone} not registered"
            rows += [_lesion_row("not compared", bone, [l], [], note) for l in bls]
            rows += [_lesion_row("not compared", bone, [], [l], note) for l in fus]
            continue
        fu_map = _lesion_id_map(fus, fu_geometry.shape)
        warped = sitk.Resample(to_sitk_image(fu_map, fu_geometry, np.uint16),
                               to_sitk_image(np.zeros(bl_geometry.shape, np.uint8), bl_geometry, np.uint8),
                               reg.sitk_transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
        warped = sitk.GetArrayFromImage(warped).transpose(2, 1, 0)
        edges: set[tuple[int, int]] = set()
        for lb in bls:
            hit = warped[tuple(np.asarray(lb.mask_index).T)]
            edges |= {(lb.id, int(f)) for f in np.unique(hit[hit > 0])}
            for lf in fus:
                c = reg.map_points(lf.centroid_world[None, :])[0]
                if np.linalg.norm(c - lb.centroid_world) <= config.lesion_match_distance_mm:
                    edges.add((lb.id, lf.id))
        # groups = connected components of the bipartite overlap graph
        groups: list[tuple[set[int], set[int]]] = []
        for b, f in edges:
            gb = [g for g in groups if b in g[0] or f in g[1]]
            merged = (set().union(*[g[0] for g in gb]) | {b}, set().union(*[g[1] for g in gb]) | {f})
            groups = [g for g in groups if g not in gb] + [merged]
        seen_b = set().union(*[g[0] for g in groups]) if groups else set()
        seen_f = set().union(*[g[1] for g in groups]) if groups else set()
        for gb_ids, gf_ids in groups:
            b_l = [l for l in bls if l.id in gb_ids]
            f_l = [l for l in fus if l.id in gf_ids]
            row = _lesion_row("persisting", bone, b_l, f_l, "")
            cb = np.average([l.centroid_world for l in b_l], axis=0, weights=[l.volume_mm3 for l in b_l])
            cf = reg.map_points(np.average([l.centroid_world for l in f_l], axis=0,
                                           weights=[l.volume_mm3 for l in f_l])[None, :])[0]
            row["centroid_shift_mm"] = float(np.linalg.norm(cf - cb))
            if len(b_l) > 1 or len(f_l) > 1:
                row["note"] = "lesions merged or split between visits"
            rows.append(row)
        rows += [_lesion_row("resolved", bone, [l], [], "") for l in bls if l.id not in seen_b]
        rows += [_lesion_row("new", bone, [], [l], "") for l in fus if l.id not in seen_f]
    return rows


def _lesion_row(status: str, bone: str, b_l: list, f_l: list, note: str) -> dict[str, Any]:
    def total(ls, attr):
        return float(sum(getattr(l, attr) for l in ls))

    def biggest(ls, attr):
        return max((getattr(l, attr) for l in ls), default=0.0)

    compared = status != "not compared"
    vb, vf = total(b_l, "volume_mm3"), total(f_l, "volume_mm3")
    ab, af = biggest(b_l, "max_slice_area_mm2"), biggest(f_l, "max_slice_area_mm2")
    region = (b_l or f_l)[0].region if (b_l or f_l) else ""
    row = {"status": status, "bone": bone, "region": region,
           "baseline_lesion_ids": ";".join(str(l.id) for l in b_l),
           "followup_lesion_ids": ";".join(str(l.id) for l in f_l),
           "baseline_volume_mm3": vb if b_l or compared else np.nan,
           "followup_volume_mm3": vf if f_l or compared else np.nan,
           "baseline_max_slice_area_mm2": ab if b_l or compared else np.nan,
           "followup_max_slice_area_mm2": af if f_l or compared else np.nan,
           "baseline_max_diameter_mm": biggest(b_l, "max_diameter_mm") if b_l or compared else np.nan,
           "followup_max_diameter_mm": biggest(f_l, "max_diameter_mm") if f_l or compared else np.nan,
           "note": note}
    if compared:
        row["volume_change_mm3"] = vf - vb
        row["volume_change_pct"] = 100.0 * (vf - vb) / vb if vb > 0 else np.nan
        row["area_change_mm2"] = af - ab
    return row


# ----------------------------------------------------------------------------- scores


def score_defect_sites(bl, fu, matches: dict[str, PlateMatch],
                       registrations: dict[str, BoneRegistration], warnings: list[str],
                       radius_mm: float = 1.0):
    """MOCART-like scores (:func:`cartiq.scoring.mocart.score_sites`) of every baseline defect
    site: at baseline on its own vertices, at follow-up on the same vertices carried by the
    bone's registration.  ``bl``/``fu`` are :class:`cartiq.longitudinal.compare.Visit`.

    Returns (csv columns, rows with a ``visit`` column, json document), or None when there
    is nothing to score or the scoring module is unavailable (a warning is added).
    """
    try:
        from cartiq.scoring.mocart import CSV_COLUMNS, SiteSpec, score_sites
    except ImportError:
        warnings.append("scoring module not available: MOCART-like scores not computed")
        return None
    sites_b, sites_f = [], []
    for d in bl.result.defects:
        pb = bl.result.plates[d.plate]
        pts = pb.points_world[pb.defect_id == d.id]
        sites_b.append(SiteSpec(site_id=d.id, points_world=pts, radius_mm=radius_mm,
                                plate=d.plate, source=f"baseline defect {d.id}"))
        reg = registrations.get(pb.bone)
        if reg is not None and reg.converged and d.plate in matches:
            sites_f.append(SiteSpec(site_id=d.id, points_world=reg.map_points_inverse(pts),
                                    radius_mm=radius_mm, plate=d.plate,
                                    source=f"baseline defect {d.id} carried by the {pb.bone} "
                                           "registration"))
        else:
            warnings.append(f"baseline defect {d.id}: site not carried to follow-up "
                            f"({pb.bone} not registered); not scored at follow-up")
    if not sites_b:
        return None
    rows, doc = [], {}
    for visit, v, sites in (("baseline", bl, sites_b), ("followup", fu, sites_f)):
        if not sites:
            continue
        try:
            res = score_sites(v.image, v.labels.array, sites, geometry=v.labels.geometry)
        except Exception as exc:  # scoring must not lose the change results
            warnings.append(f"MOCART-like scoring at {visit} failed: {exc}")
            continue
        rows += [{"visit": visit, **r} for r in res.rows()]
        doc[visit] = res.to_json()
    if not rows:
        return None
    return ["visit"] + list(CSV_COLUMNS), rows, doc
