"""Measurement stage: label map -> thickness, areas, defects, lesions per plate and subregion.

:func:`measure_labels` is pure (arrays and geometry in, records out) - the function to use
in notebooks.  :func:`run_measure` reads files, checks them, measures, and writes the output
contract (see ``docs/outputs.md``); :mod:`cartiq.cli` calls it for ``cartiq measure``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from cartiq.config import MeasureConfig, config_hash, load_config, resolved
from cartiq.measurement.defects import partial_defects, rim_vertices
from cartiq.io.volume import Geometry, is_dicom_path
from cartiq.io.labels import PLATES, default_scheme
from cartiq.measurement.lesions import find_lesions
from cartiq.measurement.regions import KneeFrame, assign_regions, knee_frame, region_parents
from cartiq.measurement.records import Defect, Lesion, MeasureResult, PlateResult
from cartiq.measurement.thickness import plate_surface

__all__ = ["PlateResult", "Defect", "Lesion", "MeasureResult", "MeasureRun", "measure_labels",
           "run_measure", "plate_rows", "METRIC_UNITS"]

log = logging.getLogger(__name__)

METRIC_UNITS = {
    "thickness_mean": "mm", "thickness_median": "mm", "thickness_sd": "mm",
    "thickness_p05": "mm", "thickness_p95": "mm", "thickness_max": "mm",
    "volume": "mm3", "interface_area": "mm2", "covered_area": "mm2", "denuded_area": "mm2",
    "denuded_area_pct": "%", "defect_count": "count", "lesion_count": "count",
    "max_slice_area": "mm2", "max_diameter": "mm",
}


@dataclass
class MeasureRun:
    out_dir: Path
    result: MeasureResult
    manifest: dict[str, Any]


# ------------------------------------------------------------------------ statistics


def _wquantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    cw = np.cumsum(weights[order])
    return float(values[order][min(np.searchsorted(cw, q * cw[-1]), len(values) - 1)])


def _thickness_stats(t: np.ndarray, w: np.ndarray) -> dict[str, float]:
    ok = np.isfinite(t)
    t, w = t[ok], w[ok]
    if t.size == 0:
        return {k: float("nan") for k in ("thickness_mean", "thickness_median", "thickness_sd",
                                           "thickness_p05", "thickness_p95", "thickness_max")}
    mean = float(np.average(t, weights=w))
    return {
        "thickness_mean": mean,
        "thickness_median": _wquantile(t, w, 0.5),
        "thickness_sd": float(np.sqrt(np.average((t - mean) ** 2, weights=w))),
        "thickness_p05": _wquantile(t, w, 0.05),
        "thickness_p95": _wquantile(t, w, 0.95),
        "thickness_max": float(t.max()),
    }


def _region_mask(codes: np.ndarray, region: str,
                 index: tuple[list[str], np.ndarray] | None = None) -> np.ndarray:
    """Points of ``codes`` in ``region`` (or a subregion of it); ``index``: the distinct
    codes and each point's position among them (:func:`_code_index`), made once."""
    if region == "all":
        return np.ones(len(codes), dtype=bool)
    distinct, which = index if index is not None else _code_index(codes)
    inside = np.array([c == region or region in region_parents(c) for c in distinct], dtype=bool)
    return inside[which]


def _code_index(codes: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The distinct codes (first-seen order) and, per point, the position of its code."""
    distinct: dict[str, int] = {}
    which = np.fromiter((distinct.setdefault(c, len(distinct)) for c in codes), dtype=np.intp,
                        count=len(codes))
    return list(distinct), which


def plate_rows(p: PlateResult, defects: list[Defect]) -> list[dict[str, Any]]:
    """Rows of ``measurements.csv`` for one plate: every metric for ``all`` and each subregion."""
    def row(region: str, metric: str, value: float) -> dict[str, Any]:
        return {"structure": p.name, "region": region, "metric": metric, "value": value,
                "unit": METRIC_UNITS[metric]}

    if not p.present:
        return [row("all", m, 0.0 if m == "volume" else float("nan"))
                for m in METRIC_UNITS if m not in ("lesion_count", "max_slice_area", "max_diameter")]
    regions = ["all"] + sorted({c for c in p.region if c} | {q for c in p.region if c
                                                              for q in region_parents(c)})
    rows = []
    index = _code_index(p.region)
    for region in regions:
        sel = _region_mask(p.region, region, index)
        cov = sel & p.covered
        stats = _thickness_stats(p.thickness_mm[cov], p.vertex_area_mm2[cov])
        total = float(p.vertex_area_mm2[sel].sum())
        covered = float(p.vertex_area_mm2[cov].sum())
        denuded = float(p.vertex_area_mm2[sel & p.denuded].sum())
        n_def = sum(1 for d in defects if d.plate == p.name
                    and (region == "all" or d.region == region or region in region_parents(d.region)))
        values = {**stats,
                  "volume": p.volume_mm3 if region == "all" else p.region_volume_mm3.get(region, 0.0),
                  "interface_area": total, "covered_area": covered, "denuded_area": denuded,
                  "denuded_area_pct": 100.0 * denuded / total if total > 0 else float("nan"),
                  "defect_count": float(n_def)}
        rows += [row(region, m, v) for m, v in values.items()]
    return rows


def _lesion_rows(lesions: list[Lesion], slice_axis: int, spacing: np.ndarray) -> list[dict[str, Any]]:
    in_plane = float(np.prod(np.delete(spacing, slice_axis)))
    rows = []
    for bone in ("all", "femur", "tibia", "patella"):
        sel = [l for l in lesions if bone == "all" or l.bone == bone]
        if sel:
            counts = np.bincount(np.concatenate([l.mask_index[:, slice_axis] for l in sel]))
            area = float(counts.max()) * in_plane
        else:
            area = 0.0
        values = {"volume": sum(l.volume_mm3 for l in sel), "lesion_count": float(len(sel)),
                  "max_slice_area": area,
                  "max_diameter": max((l.max_diameter_mm for l in sel), default=0.0)}
        rows += [{"structure": "bone_marrow_lesion", "region": bone, "metric": m, "value": v,
                  "unit": METRIC_UNITS[m]} for m, v in values.items()]
    return rows


# ------------------------------------------------------------------------ measuring


def _measure_plate(name: str, labels: np.ndarray, bone_mask: np.ndarray, geometry: Geometry,
                   frame: KneeFrame | None, config: MeasureConfig,
                   thickness_map: np.ndarray, offset_index: np.ndarray) -> PlateResult:
    """Measure one plate in a crop of the volume starting at voxel ``offset_index``."""
    scheme = default_scheme()
    bone_name = scheme.plates[name]
    cart = labels == scheme[name]
    spacing = np.asarray(geometry.spacing)
    tc, dc = config.thickness, config.defects
    surf = plate_surface(cart, bone_mask, spacing, sigma_mm=tc.smoothing_sigma_mm,
                         cover_fraction=tc.cover_fraction, margin_mm=tc.crop_margin_mm,
                         min_hole_area_mm2=dc.min_defect_area_mm2,
                         max_hole_fraction=dc.max_hole_fraction,
                         min_sigma_voxels=tc.min_sigma_voxels,
                         mesh_smoothing_iterations=tc.mesh_smoothing_iterations,
                         method=tc.thickness_method,
                         articular_max_angle_deg=tc.articular_max_angle_deg,
                         rim_exclusion_mm=tc.rim_exclusion_mm,
                         normal_smoothing_iterations=tc.normal_smoothing_iterations,
                         ray_max_mm=tc.ray_max_mm)
    if surf is None:
        return PlateResult(name=name, bone=bone_name, present=False,
                           volume_mm3=float(cart.sum()) * geometry.voxel_volume_mm3)
    surf.points_mm = surf.points_mm + offset_index * spacing
    world = geometry.physical_to_world(surf.points_mm)
    if frame is not None:
        region = assign_regions(name, world, surf.vertex_area_mm2, frame,
                                tibia_central_fraction=config.regions.tibia_central_fraction,
                                femur_anterior_shift=config.regions.femur_central_anterior_fraction)
    else:
        region = np.full(len(world), "", dtype=object)
    partial_id, expected = partial_defects(
        surf.points_mm, surf.faces, surf.vertex_area_mm2, surf.thickness_mm, surf.covered,
        fraction=dc.partial_fraction, radius_mm=dc.expected_radius_mm,
        min_area_mm2=dc.min_defect_area_mm2,
        rim=rim_vertices(len(surf.points_mm), surf.faces, ~surf.covered))
    thickness = surf.thickness_mm.copy()
    thickness[surf.denuded] = 0.0
    # thickness map and per-region volume: each cartilage voxel takes its nearest surface point
    vox = np.argwhere(cart)
    region_volume: dict[str, float] = {}
    if len(vox):
        dist, nearest = cKDTree(surf.points_mm).query((vox + offset_index) * spacing,
                                                      workers=-1)
        t_vox = thickness[nearest]
        ok = np.isfinite(t_vox) & (dist <= config.thickness.map_max_distance_mm)
        thickness_map[tuple(vox[ok].T)] = t_vox[ok]
        counts = Counter(region[nearest].tolist())
        voxvol = geometry.voxel_volume_mm3
        for code, n in counts.items():
            for r in [code] + region_parents(code):
                if r:
                    region_volume[r] = region_volume.get(r, 0.0) + n * voxvol
    plate = PlateResult(
        name=name, bone=bone_name, present=True,
        volume_mm3=float(cart.sum()) * geometry.voxel_volume_mm3,
        points_world=world, faces=surf.faces, thickness_mm=thickness,
        expected_thickness_mm=expected, covered=surf.covered, denuded=surf.denuded,
        vertex_area_mm2=surf.vertex_area_mm2, region=region,
        defect_id=np.zeros(len(world), dtype=np.int64), region_volume_mm3=region_volume)
    plate._hole_id = surf.hole_id  # type: ignore[attr-defined]
    plate._partial_id = partial_id  # type: ignore[attr-defined]
    return plate


def _collect_defects(plate: PlateResult, next_id: int) -> list[Defect]:
    out = []
    for kind, ids in (("full", plate._hole_id), ("partial", plate._partial_id)):  # type: ignore[attr-defined]
        for k in range(1, int(ids.max(initial=0)) + 1):
            sel = ids == k
            if not sel.any():
                continue
            w = plate.vertex_area_mm2[sel]
            codes = [c for c in plate.region[sel] if c]
            region = Counter(codes).most_common(1)[0][0] if codes else "all"
            if kind == "full":
                depth = 100.0
            else:
                t, e = plate.thickness_mm[sel], plate.expected_thickness_mm[sel]
                depth = float(np.average(100.0 * (1.0 - t / e), weights=w))
            plate.defect_id[sel] = next_id
            out.append(Defect(id=next_id, plate=plate.name, region=region, kind=kind,
                              area_mm2=float(w.sum()), depth_pct=depth,
                              centroid_world=np.average(plate.points_world[sel], axis=0, weights=w)))
            next_id += 1
    return out


def measure_labels(labels: np.ndarray, geometry: Geometry, *, side: str | None,
                   config: MeasureConfig | None = None, log_warnings: bool = True) -> MeasureResult:
    """Measure every plate and lesion of a label map in the cartiq scheme.

    Parameters
    ----------
    labels : integer array in ITK index order, cartiq label scheme.
    geometry : its voxel grid (spacing in mm, LPS orientation).
    side : 'left' or 'right' (None: subregions are not assigned).
    config : measurement settings (defaults: ``configs/measure.yaml``).
    log_warnings : log the result's warnings (False: only in ``result.warnings``).
    """
    config = config or MeasureConfig()
    scheme = default_scheme()
    spacing = np.asarray(geometry.spacing, dtype=float)
    warnings: list[str] = []
    bones = {b: scheme[b] for b in scheme.bones}
    comps = find_lesions(labels, spacing, bml_label=scheme["bone_marrow_lesion"], bones=bones,
                         slice_axis=geometry.slice_axis(),
                         min_volume_mm3=config.lesions.min_lesion_volume_mm3,
                         connectivity=config.lesions.connectivity)
    boxes = ndimage.find_objects(labels)
    frame = knee_frame(labels, geometry.affine, side, scheme.labels,
                       boxes={n: boxes[v - 1] if v <= len(boxes) else None
                              for n, v in scheme.labels.items() if v > 0}) if side else None
    if side is None:
        warnings.append("knee side unknown: subregions not assigned (pass --side)")
    thickness_map = np.zeros(labels.shape, dtype=np.float32)
    plates: dict[str, PlateResult] = {}
    margin = np.ceil(config.thickness.crop_margin_mm / spacing).astype(int) + 2
    for name in PLATES:
        value = scheme[name]
        box = boxes[value - 1] if value <= len(boxes) else None
        if box is None:
            plates[name] = PlateResult(name=name, bone=scheme.plates[name], present=False)
            warnings.append(f"{name}: plate absent or not on its bone; reported as missing")
            continue
        crop = tuple(slice(max(b.start - m, 0), min(b.stop + m, n))
                     for b, m, n in zip(box, margin, labels.shape))
        start = np.array([c.start for c in crop])
        sub = labels[crop]
        bone_mask = sub == scheme[scheme.plates[name]]
        for c in comps:  # lesion voxels are marrow of their bone
            if c.bone == scheme.plates[name]:
                local = c.voxels - start
                inside = np.all((local >= 0) & (local < np.array(sub.shape)), axis=1)
                bone_mask[tuple(local[inside].T)] = True
        plates[name] = _measure_plate(name, sub, bone_mask, geometry, frame, config,
                                      thickness_map[crop], start)
        if not plates[name].present:
            warnings.append(f"{name}: plate absent or not on its bone; reported as missing")
    defects: list[Defect] = []
    for p in plates.values():
        if p.present:
            defects += _collect_defects(p, len(defects) + 1)
    lesions = []
    for c in comps:
        region = "all"
        on_bone = [p for p in plates.values() if p.present and p.bone == c.bone and len(p.points_world)]
        centroid = geometry.index_to_world(c.centroid_index)[0]
        if on_bone:
            pts = np.concatenate([p.points_world for p in on_bone])
            codes = np.concatenate([p.region for p in on_bone])
            _, i = cKDTree(pts).query(centroid)
            region = codes[i] or "all"
        lesions.append(Lesion(id=c.id, bone=c.bone, region=region, volume_mm3=c.volume_mm3,
                              max_slice_area_mm2=c.max_slice_area_mm2,
                              max_diameter_mm=c.max_diameter_mm, centroid_world=centroid,
                              mask_index=c.voxels))
    rows = []
    for p in plates.values():
        rows += plate_rows(p, defects)
    rows += _lesion_rows(lesions, geometry.slice_axis(), spacing)
    for w in warnings if log_warnings else ():
        log.warning(w)
    return MeasureResult(side=side, geometry=geometry, plates=plates, defects=defects,
                      lesions=lesions, rows=rows, thickness_map=thickness_map, warnings=warnings,
                      plate_boxes={n: boxes[scheme[n] - 1] if scheme[n] <= len(boxes) else None
                                   for n in PLATES})


def run_measure(image: Path, seg: Path, out_dir: Path, *, labels: str | None = None,
                side: str | None = None, config_path: Path | None = None,
                series: str | None = None, echo: int | None = None,
                extra_manifest: dict[str, Any] | None = None,
                dicom_out: bool = False, fresh: bool = True, side_source: str = "flag",
                side_override: bool = False) -> MeasureRun:
    """Read, check, measure and write one scan's results (see module docstring).

    ``dicom_out``: also write the segmentation as DICOM SEG and the measurements as a DICOM
    SR (TID 1500) into ``out_dir/dicom`` (the input must be a DICOM series).
    ``fresh``: empty ``out_dir`` before writing, refusing one that holds an input;
    ``False`` keeps what an earlier step of the same run wrote there (``cartiq run``).
    ``side_source``: where ``side`` came from (flag, manifest, ...); a side the anatomy
    contradicts is an error unless ``side_override`` (see :mod:`cartiq.io.side`).
    """
    from cartiq.measurement.outputs import load_inputs, write_results

    t0 = time.perf_counter()
    config = load_config(config_path, MeasureConfig, default_name="measure.yaml")
    took: dict[str, float] = {}

    def measure(inputs) -> MeasureResult:  # while the image is still being read
        if dicom_out and not is_dicom_path(image):
            from cartiq.errors import InputError

            raise InputError("--dicom-out needs a DICOM input series", image)
        t = time.perf_counter()
        res = measure_labels(inputs.labels, inputs.geometry, side=inputs.side, config=config,
                             log_warnings=False)
        took["measure"] = time.perf_counter() - t
        return res

    inputs = load_inputs(Path(image), Path(seg), Path(out_dir), labels=labels, side=side,
                         series=series, echo=echo, fresh=fresh, side_source=side_source,
                         side_override=side_override, meanwhile=measure)
    result = inputs.meanwhile
    for w in result.warnings:  # once the inputs are known to be good
        log.warning(w)
    t2 = time.perf_counter()
    manifest = {
        "stage": "measure",
        "inputs": inputs.describe(),
        "side": inputs.side,
        "side_source": inputs.side_source,
        "side_check": inputs.side_check,
        "label_mapping": inputs.mapping_name,
        "config": resolved(config),
        "config_hash": config_hash(config),
        # reading overlaps measuring: "read" is the rest of the time until both are done
        "timings_s": {"read": round(t2 - t0 - took["measure"], 3),
                      "measure": round(took["measure"], 3)},
        **(extra_manifest or {}),
    }
    manifest = write_results(Path(out_dir), result, inputs, config, manifest, t_start=t2,
                             dicom_out=dicom_out, fresh=fresh)
    return MeasureRun(out_dir=Path(out_dir), result=result, manifest=manifest)
