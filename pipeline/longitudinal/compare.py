"""Longitudinal comparison of two finished scans of one knee (stage ``compare``).

``compare_scans(baseline_dir, followup_dir, out_dir)`` reads two finished ``cartiq
measure``/``run`` folders, re-measures both label maps with the baseline's measurement
config (to get per-vertex values), registers the follow-up to the baseline per bone
(:mod:`cartiq.longitudinal.register`), compares thickness at the same places (:mod:`cartiq.longitudinal.tracking`)
and writes, in ``out_dir``:

``change.csv``            structure,region,metric,baseline,followup,change,unit,exceeds_sdc,note
``thickness_change.nii.gz`` smoothed thickness change (mm) on baseline cartilage voxels
``meshes/<plate>_change.vtk`` baseline surface with per-vertex thickness at both visits
``defect_tracking.csv``   fate of every baseline defect, plus new defects
``lesion_tracking.csv``   BMLs matched across visits (volume/area change, new, resolved)
``mocart.csv``/``mocart.json`` MOCART-like scores of every baseline defect site, both visits
``registration.json``, ``transforms/<bone>.tfm``  per-bone rigid transforms and quality
``manifest.json``         provenance, warnings, status - written last

Subregions at follow-up are the baseline's, carried over by the registration (each
follow-up vertex takes the region of its nearest baseline vertex), so a changed knee
position in the scanner does not move the regions.  See ``docs/longitudinal.md``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from scipy.spatial import cKDTree

from cartiq.config import MeasureConfig, Strict, config_hash, load_config, resolved
from cartiq.errors import InputError
from cartiq.io.volume import Volume, read_volume, write_volume
from cartiq.io.labels import default_scheme
from cartiq.longitudinal.register import BoneRegistration, RegistrationConfig, register_visits
from cartiq.longitudinal.records import registration_qc
from cartiq.longitudinal.tracking import (DEFECT_TRACKING_COLUMNS, LESION_TRACKING_COLUMNS, MatchingConfig,
                               PlateMatch, carry_regions, change_summary, match_plate, region_select,
                               score_defect_sites, track_defects, track_lesions)

__all__ = ["SdcEntry", "SdcConfig", "MismatchConfig", "CompareConfig", "load_compare_config",
           "Visit", "load_visit", "CompareResult", "compare_scans", "compare_inputs",
           "CHANGE_COLUMNS"]

log = logging.getLogger(__name__)

CHANGE_COLUMNS = ["structure", "region", "metric", "baseline", "followup", "change", "unit",
                  "exceeds_sdc", "note"]
VERTEX_METRICS = {"thickness_matched_mean": "mm", "thinning": "mm", "thickening": "mm"}


# ----------------------------------------------------------------------------- config


class SdcEntry(Strict):
    """Smallest detectable change of one metric: max(k * cv% * |baseline|, floor)."""

    cv_pct: float = Field(0.0, ge=0, description="test-retest RMS CV (%) of the whole plate")
    subregion_cv_pct: float | None = Field(None, ge=0, description="for subregions (default cv_pct)")
    floor_mm: float = Field(0.0, ge=0)
    floor_mm2: float = Field(0.0, ge=0)
    floor_mm3: float = Field(0.0, ge=0)
    floor_pct: float = Field(0.0, ge=0)
    floor_count: float = Field(0.0, ge=0)
    source: str = ""
    verified: bool = False

    def sdc(self, baseline: float, unit: str, region: str, k: float) -> float:
        cv = self.cv_pct if region == "all" or self.subregion_cv_pct is None else self.subregion_cv_pct
        floor = {"mm": self.floor_mm, "mm2": self.floor_mm2, "mm3": self.floor_mm3,
                 "%": self.floor_pct, "count": self.floor_count}.get(unit, 0.0)
        rel = k * cv / 100.0 * abs(baseline) if np.isfinite(baseline) else 0.0
        return max(rel, floor)


class SdcConfig(Strict):
    k_factor: float = Field(2.77, gt=0, description="SDC = k x test-retest SD; 1.96*sqrt(2)")
    metrics: dict[str, SdcEntry] = Field(default_factory=dict)


class MismatchConfig(Strict):
    min_dice: float = Field(0.9, gt=0, le=1, description="bone overlap after registration")
    max_residual_mm: float = Field(0.6, gt=0, description="bone-surface distance after "
        "registration (or the bone's residual_limit_mm when that is larger)")
    volume_ratio_range: tuple[float, float] = (0.92, 1.09)
    min_failing_bones: int = Field(2, ge=1,
        description="the pair is a mismatch when this many bones fail (or all registered ones)")


class CompareConfig(Strict):
    registration: RegistrationConfig = RegistrationConfig()
    matching: MatchingConfig = MatchingConfig()
    mismatch: MismatchConfig = MismatchConfig()
    sdc: SdcConfig = SdcConfig()


def load_compare_config(sdc_path: str | Path | None = None) -> CompareConfig:
    """Default compare settings with the SDC table from ``sdc_path`` (or configs/sdc.yaml)."""
    return CompareConfig(sdc=load_config(sdc_path, SdcConfig, default_name="sdc.yaml"))


# ----------------------------------------------------------------------------- visits


@dataclass
class Visit:
    """One finished scan folder, re-measured for per-vertex values."""

    folder: Path
    manifest: dict[str, Any]
    labels: Volume
    image: Volume | None
    side: str | None
    measure_config: MeasureConfig
    result: Any = None  # cartiq.measurement.measure.MeasureResult
    warnings: list[str] = field(default_factory=list)


def load_visit(folder: str | Path, name: str) -> Visit:
    """Read a finished output folder (manifest, segmentation, measurement config, image)."""
    from cartiq.io.outputs import read_manifest

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{name} folder does not exist", folder)
    manifest = read_manifest(folder)
    seg = folder / "segmentation.nii.gz"
    if not seg.is_file():
        raise InputError(f"{name} folder has no segmentation.nii.gz", folder)
    labels = read_volume(seg, kind="labels")
    cfg_path = folder / "config.yaml"
    mcfg = load_config(cfg_path if cfg_path.is_file() else None, MeasureConfig)
    warnings: list[str] = []
    image = None
    img_path = ((manifest.get("inputs") or {}).get("image") or {}).get("path")
    if img_path:
        try:
            image = read_volume(img_path, series=(manifest["inputs"]["image"].get("series_number")
                                                  if Path(img_path).is_dir() else None))
            if tuple(image.geometry.shape) != tuple(labels.geometry.shape):
                warnings.append(f"{name} image {img_path} does not match its segmentation; "
                                "intensity refinement and intensity scores skipped")
                image = None
        except Exception as exc:  # the image is optional here: registration falls back
            warnings.append(f"{name} image {img_path} unreadable ({exc}); intensity "
                            "refinement and intensity scores skipped")
    else:
        warnings.append(f"{name} manifest names no input image; intensity steps skipped")
    return Visit(folder=folder, manifest=manifest, labels=labels, image=image,
                 side=manifest.get("side"), measure_config=mcfg, warnings=warnings)


def _acquisition_warnings(bl: Visit, fu: Visit) -> list[str]:
    out = []
    ib = (bl.manifest.get("inputs") or {}).get("image") or {}
    if_ = (fu.manifest.get("inputs") or {}).get("image") or {}
    for key, what in (("manufacturer", "scanner manufacturer"), ("model", "scanner model"),
                      ("field_strength_t", "field strength (T)"), ("sequence", "sequence"),
                      ("series_description", "series description"),
                      ("echo_time_ms", "echo time (ms)"), ("repetition_time_ms", "repetition time (ms)")):
        a, b = ib.get(key), if_.get(key)
        if a not in (None, "") and b not in (None, "") and str(a) != str(b):
            out.append(f"visits differ in {what}: baseline {a}, follow-up {b}")
    sa, sb = np.asarray(bl.labels.geometry.spacing), np.asarray(fu.labels.geometry.spacing)
    if not np.allclose(np.sort(sa), np.sort(sb), rtol=0.05):
        out.append(f"visits differ in voxel size: baseline {np.round(sa, 3).tolist()} mm, "
                   f"follow-up {np.round(sb, 3).tolist()} mm")
    return out


# ----------------------------------------------------------------------------- result


@dataclass
class CompareResult:
    out_dir: Path
    status: str  # "ok" | "partial" | "mismatch" | "failed"
    rows: list[dict[str, Any]]
    registrations: dict[str, BoneRegistration]
    defect_rows: list[dict[str, Any]]
    lesion_rows: list[dict[str, Any]]
    warnings: list[str]
    manifest: dict[str, Any]
    mismatch_reasons: list[str] = field(default_factory=list)


def _mismatch(regs: dict[str, BoneRegistration], cfg: MismatchConfig) -> list[str]:
    reasons, registered = [], [r for r in regs.values() if r.present]
    lo, hi = cfg.volume_ratio_range
    for r in registered:
        why = []
        limit = max(cfg.max_residual_mm, r.residual_limit_mm if np.isfinite(r.residual_limit_mm)
                    else 0.0)  # never below the bone's own residual limit
        if not np.isfinite(r.residual_mm) or r.residual_mm > limit:
            why.append(f"surface residual {r.residual_mm:.2f} mm > {limit:.2f}")
        if not np.isfinite(r.dice) or r.dice < cfg.min_dice:
            why.append(f"Dice {r.dice:.3f} < {cfg.min_dice}")
        if not np.isfinite(r.volume_ratio) or not lo <= r.volume_ratio <= hi:
            why.append(f"volume ratio {r.volume_ratio:.2f} outside [{lo}, {hi}]")
        if why:
            reasons.append(f"{r.bone}: " + ", ".join(why))
    if registered and len(reasons) >= min(cfg.min_failing_bones, len(registered)):
        return reasons
    return []


def _change_rows(bl: Visit, fu: Visit, fu_rows: list[dict[str, Any]], carried: set[str],
                 matches: dict[str, PlateMatch], regs: dict[str, BoneRegistration],
                 cfg: CompareConfig) -> list[dict[str, Any]]:
    key = lambda r: (r["structure"], r["region"], r["metric"])  # noqa: E731
    carried_rows = {key(r): r for r in fu_rows}
    fu_own = {key(r): r for r in fu.result.rows}
    rows = []
    for r in bl.result.rows:
        k = key(r)
        structure, region = r["structure"], r["region"]
        note = ""
        plate_b = bl.result.plates.get(structure)
        if plate_b is not None:
            plate_f = fu.result.plates[structure]
            if region != "all" and structure not in carried:
                f = None
                note = f"{structure}: subregions not carried over ({_why(plate_f, regs, plate_b.bone)})"
            else:
                f = carried_rows.get(k) if structure in carried else fu_own.get(k)
                if f is None:
                    note = f"region {region} has no follow-up surface"
            if not plate_b.present or not plate_f.present:
                f = None
                note = f"{structure} missing at {'baseline' if not plate_b.present else 'follow-up'}"
        else:
            f = fu_own.get(k)
        rows.append(_row(structure, region, r["metric"], r["value"],
                         np.nan if f is None else f["value"], r["unit"], note, cfg.sdc))
        if plate_b is not None and r["metric"] == "thickness_max":  # vertex-wise block after stats
            rows += _vertex_rows(structure, region, plate_b, matches.get(structure), regs, fu, cfg)
    return rows


def _why(plate_f, regs: dict[str, BoneRegistration], bone: str) -> str:
    if not plate_f.present:
        return "plate missing at follow-up"
    r = regs.get(bone)
    if r is None or not r.present:
        return f"{bone} not registered"
    return r.reason or "registration did not converge"


def _vertex_rows(structure, region, pb, m, regs, fu, cfg) -> list[dict[str, Any]]:
    if m is None:
        note = _why(fu.result.plates[structure], regs, pb.bone) if pb.present else \
            f"{structure} missing at baseline"
        return [_row(structure, region, k, np.nan, np.nan, u, note, cfg.sdc)
                for k, u in VERTEX_METRICS.items()]
    s = change_summary(m, pb.vertex_area_mm2, region_select(pb.region, region))
    note = f"matched {s['matched_pct']:.0f}% of the baseline area"
    return [_row(structure, region, "thickness_matched_mean", s["baseline"], s["followup"], "mm",
                 note, cfg.sdc),
            _row(structure, region, "thinning", np.nan, np.nan, "mm", note, cfg.sdc, s["thinning"]),
            _row(structure, region, "thickening", np.nan, np.nan, "mm", note, cfg.sdc,
                 s["thickening"])]


def _row(structure, region, metric, base, follow, unit, note, sdc: SdcConfig,
         change: float | None = None) -> dict[str, Any]:
    base, follow = float(base), float(follow)
    if change is None:
        change = follow - base
    entry = sdc.metrics.get(f"{structure}.{metric}", sdc.metrics.get(metric))
    exceeds = ""
    if entry is not None and np.isfinite(change):
        exceeds = "true" if abs(change) > entry.sdc(base, unit, region, sdc.k_factor) else "false"
    return {"structure": structure, "region": region, "metric": metric, "baseline": base,
            "followup": follow, "change": change, "unit": unit, "exceeds_sdc": exceeds,
            "note": note}


# ----------------------------------------------------------------------------- API


def compare_scans(baseline_dir: str | Path, followup_dir: str | Path, out_dir: str | Path, *,
                  config: CompareConfig | None = None,
                  allow_mismatch: bool = False, fresh: bool = True) -> CompareResult:
    """Compare a follow-up scan with its baseline; write the change outputs to ``out_dir``
    (``fresh``: emptied first, and refused when it holds a visit folder; ``False``: keep the
    visit folders :func:`compare_inputs` measured into it).

    Raises
    ------
    InputError
        when nothing can be compared: an unfinished folder, different knee sides, no bone
        registered, or (unless ``allow_mismatch``) a pair that does not look like the same
        knee.  Where possible ``registration.json`` and ``manifest.json`` (with the reason)
        are written first.
    """
    from cartiq.io.outputs import begin_folder, check_writable, write_manifest

    t0 = time.perf_counter()
    cfg = config or load_compare_config()
    out = Path(out_dir)
    for name, folder in (("baseline", baseline_dir), ("follow-up", followup_dir)):
        if Path(folder).resolve() == out.resolve():
            raise InputError(f"the output folder is the {name} folder; choose another", out)
    visits = (baseline_dir, followup_dir) if fresh else ()
    check_writable(out, inputs=visits)
    bl, fu = load_visit(baseline_dir, "baseline"), load_visit(followup_dir, "follow-up")
    warnings = bl.warnings + fu.warnings + _acquisition_warnings(bl, fu)
    manifest: dict[str, Any] = {
        "stage": "compare",
        "inputs": {"baseline": _describe(bl), "followup": _describe(fu)},
        "config": resolved(cfg), "config_hash": config_hash(cfg)}
    begin_folder(out, fresh=fresh, inputs=visits)
    _remove_stale(out)

    def fail(status: str, message: str, regs=None, reasons=()) -> None:
        manifest.update(status=status, error=message, warnings=warnings,
                        qc=registration_qc(regs or {}, list(reasons),
                                           error=None if reasons else message))
        if regs:
            manifest["outputs"] = [_write_registration(out, regs, [])]
        write_manifest(out, manifest)
        raise InputError(message, out)

    if bl.side and fu.side and bl.side != fu.side:
        fail("failed", f"baseline is a {bl.side} knee but follow-up is a {fu.side} knee; "
                       "nothing compared")
    side = bl.side or fu.side
    if bl.manifest.get("config_hash") and fu.manifest.get("config_hash") and \
            bl.manifest["config_hash"] != fu.manifest["config_hash"]:
        warnings.append("visits were measured with different configs; both re-measured with "
                        "the baseline's")
    t1 = time.perf_counter()
    bl.result, fu.result = (_measured(v, side, bl.measure_config) for v in (bl, fu))
    t2 = time.perf_counter()
    regs = register_visits(bl.labels, fu.labels, baseline_image=bl.image, followup_image=fu.image,
                           config=cfg.registration)
    t3 = time.perf_counter()
    for r in regs.values():
        if r.reason:
            warnings.append(r.reason)
        elif r.present and r.residual_flag:
            warnings.append(f"{r.bone}: residual {r.residual_mm:.2f} mm exceeds its limit "
                            f"({r.residual_limit_mm:.2f} mm, one voxel along the surface normal)")
    reasons = _mismatch(regs, cfg.mismatch)
    manifest["mismatch"] = {"suspected": bool(reasons), "reasons": reasons}
    if reasons and not allow_mismatch:
        fail("mismatch", "baseline and follow-up do not look like the same knee ("
             + "; ".join(reasons) + "); nothing compared (override with --allow-mismatch)", regs,
             reasons)
    if reasons:
        warnings.append("MISMATCH SUSPECTED (compared anyway): " + "; ".join(reasons))
    if not any(r.converged for r in regs.values()):
        fail("failed", "no bone could be registered (" + "; ".join(
            r.reason for r in regs.values()) + "); nothing compared", regs)

    matches: dict[str, PlateMatch] = {}
    for name, pb in bl.result.plates.items():
        pf, reg = fu.result.plates[name], regs.get(pb.bone)
        if pb.present and pf.present and reg is not None and reg.converged:
            matches[name] = match_plate(pb, pf, reg, cfg.matching)
        elif not (pb.present and pf.present):
            warnings.append(f"{name} missing at {'baseline' if not pb.present else 'follow-up'}; "
                            "its changes are NaN")
    fu_rows, carried = carry_regions(bl.result, fu.result, fu.labels, matches,
                                     cfg.matching.max_match_distance_mm)
    rows = _change_rows(bl, fu, fu_rows, carried, matches, regs, cfg)
    area_sdc = cfg.sdc.metrics.get("denuded_area", SdcEntry())
    defect_rows = track_defects(bl.result, fu.result, matches, regs, cfg.matching,
                                area_sdc=lambda a: area_sdc.sdc(a, "mm2", "all", cfg.sdc.k_factor))
    lesion_rows = track_lesions(bl.result, fu.result, bl.labels.geometry, fu.labels.geometry,
                                regs, cfg.matching)
    t4 = time.perf_counter()
    outputs = _write_outputs(out, bl, fu, rows, defect_rows, lesion_rows, matches, regs, warnings)
    status = "partial" if len(matches) < sum(p.present for p in bl.result.plates.values()) \
        or reasons else "ok"
    manifest.update(status=status, side=side, warnings=warnings, outputs=outputs,
                    qc=registration_qc(regs, reasons),
                    timings_s={"read": round(t1 - t0, 2), "measure": round(t2 - t1, 2),
                               "register": round(t3 - t2, 2), "compare": round(t4 - t3, 2),
                               "write": round(time.perf_counter() - t4, 2)})
    write_manifest(out, manifest)
    for w in warnings:
        log.warning(w)
    return CompareResult(out_dir=out, status=status, rows=rows, registrations=regs,
                         defect_rows=defect_rows, lesion_rows=lesion_rows, warnings=warnings,
                         manifest=manifest, mismatch_reasons=reasons)


def _measured(v: Visit, side: str | None, config: MeasureConfig):
    """The visit's own saved measurement when it fits (same side and config), else a new one:
    a scan is measured once and its surfaces reused by every comparison."""
    from cartiq.measurement.measure import measure_labels
    from cartiq.measurement.store import load_if_current

    saved = load_if_current(v.folder, v.labels.geometry, side=side,
                            config_hash=config_hash(config))
    if saved is not None:
        return saved
    return measure_labels(v.labels.array, v.labels.geometry, side=side, config=config)


def _remove_stale(out: Path) -> None:
    """Remove the files of an earlier compare in ``out``, so a failed run leaves none behind."""
    for name in ("change.csv", "defect_tracking.csv", "lesion_tracking.csv", "mocart.csv",
                 "mocart.json", "registration.json", "thickness_change.nii.gz"):
        (out / name).unlink(missing_ok=True)
    for sub in ("transforms", "meshes"):
        if (out / sub).is_dir():
            for f in (out / sub).iterdir():
                if f.suffix in (".tfm", ".vtk") and (sub == "transforms" or f.stem.endswith("_change")):
                    f.unlink()


def _describe(v: Visit) -> dict[str, Any]:
    m = v.manifest
    return {"folder": str(v.folder.resolve()), "side": v.side,
            "image": ((m.get("inputs") or {}).get("image") or {}).get("path"),
            "image_sha256": ((m.get("inputs") or {}).get("image") or {}).get("sha256"),
            "config_hash": m.get("config_hash"), "cartiq_version": m.get("cartiq_version"),
            "geometry": v.labels.geometry.to_json()}


def _write_registration(out: Path, regs: dict[str, BoneRegistration], outputs: list[str]) -> str:
    import SimpleITK as sitk

    from cartiq.io.volume import atomic_path, atomic_write_text

    doc = {"convention": "matrix_followup_to_baseline_lps maps follow-up LPS mm to baseline LPS "
                         "mm; transforms/<bone>.tfm map baseline points to follow-up points "
                         "(ITK resampling convention)",
           "bones": {b: r.to_json() for b, r in regs.items()}}
    for b, r in regs.items():
        if r.sitk_transform is not None:
            with atomic_path(out / "transforms" / f"{b}.tfm") as tmp:
                sitk.WriteTransform(r.sitk_transform, str(tmp))
            outputs.append(f"transforms/{b}.tfm")
    atomic_write_text(out / "registration.json", json.dumps(_clean(doc), indent=2) + "\n")
    return "registration.json"


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _write_outputs(out: Path, bl: Visit, fu: Visit, rows, defect_rows, lesion_rows,
                   matches: dict[str, PlateMatch], regs, warnings: list[str]) -> list[str]:
    from cartiq.io.outputs import write_csv, write_vtk_polydata

    outputs: list[str] = []
    write_csv(out / "change.csv", CHANGE_COLUMNS, rows)
    write_csv(out / "defect_tracking.csv", DEFECT_TRACKING_COLUMNS, defect_rows)
    write_csv(out / "lesion_tracking.csv", LESION_TRACKING_COLUMNS, lesion_rows)
    outputs += ["change.csv", "defect_tracking.csv", "lesion_tracking.csv"]
    scheme = default_scheme()
    geo = bl.labels.geometry
    cmap = np.zeros(geo.shape, dtype=np.float32)
    for name, m in matches.items():
        pb = bl.result.plates[name]
        write_vtk_polydata(out / "meshes" / f"{name}_change.vtk", pb.points_world, pb.faces, {
            "thickness_baseline_mm": m.thickness_baseline_mm,
            "thickness_followup_mm": m.thickness_followup_mm,
            "thickness_change_mm": m.change_mm,
            "thickness_change_smoothed_mm": m.change_smoothed_mm,
            "matched": m.matched.astype(float),
            "baseline_defect_id": pb.defect_id.astype(float)}, title=f"cartiq {name} change")
        outputs.append(f"meshes/{name}_change.vtk")
        vox = np.argwhere(bl.labels.array == scheme[name])
        if len(vox):
            _, near = cKDTree(pb.points_world).query(geo.index_to_world(vox), workers=-1)
            cmap[tuple(vox.T)] = np.nan_to_num(m.change_smoothed_mm[near])
    write_volume(out / "thickness_change.nii.gz", cmap, geo)
    outputs.append("thickness_change.nii.gz")
    outputs += _write_scores(out, bl, fu, matches, regs, warnings)
    outputs.insert(0, _write_registration(out, regs, outputs))
    return outputs


def _write_scores(out: Path, bl: Visit, fu: Visit, matches, regs, warnings: list[str]) -> list[str]:
    """MOCART-like scores of every baseline defect site at baseline and at follow-up."""
    from cartiq.io.volume import atomic_write_text
    from cartiq.io.outputs import write_csv

    scored = score_defect_sites(bl, fu, matches, regs, warnings)
    if scored is None:
        return []
    columns, rows, doc = scored
    write_csv(out / "mocart.csv", columns, rows)
    atomic_write_text(out / "mocart.json", json.dumps(_clean(doc), indent=2, default=str) + "\n")
    return ["mocart.csv", "mocart.json"]


def compare_inputs(baseline_image: Path, baseline_seg: Path, followup_image: Path,
                   followup_seg: Path, out_dir: Path, *, labels: str | None = None,
                   side: str | None = None, measure_config: Path | None = None,
                   config: CompareConfig | None = None,
                   allow_mismatch: bool = False, side_override: bool = False) -> CompareResult:
    """Measure two image + label-map pairs into ``out_dir/baseline`` and ``/followup``,
    then :func:`compare_scans` them.  ``side_override``: keep ``side`` where a visit's
    anatomy contradicts it (recorded in that visit's ``side_check``)."""
    from cartiq.io.outputs import begin_folder
    from cartiq.measurement.measure import run_measure

    out = Path(out_dir)
    begin_folder(out, inputs=(baseline_image, baseline_seg, followup_image, followup_seg))
    run_measure(Path(baseline_image), Path(baseline_seg), out / "baseline", labels=labels,
                side=side, config_path=measure_config, side_override=side_override)
    run_measure(Path(followup_image), Path(followup_seg), out / "followup", labels=labels,
                side=side, config_path=measure_config, side_override=side_override)
    return compare_scans(out / "baseline", out / "followup", out, config=config,
                         allow_mismatch=allow_mismatch, fresh=False)
