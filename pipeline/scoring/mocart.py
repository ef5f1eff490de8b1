"""MOCART-like scoring of cartilage repair sites (stage ``score``).

A *site* is one cartilage repair (or defect) region.  For every site the seven MOCART 2.0
knee items (Schreiner et al., Cartilage 2021) are computed from measured quantities (see
:mod:`cartiq.scoring.columns` for the method), mapped to categories and points by a plain
YAML config (``configs/mocart2.yaml``; ``configs/mocart1.yaml`` for the original MOCART),
and written as ``mocart.csv`` (one row per item per site plus a ``total`` row) and
``mocart.json`` (the same plus every measured quantity, confidence flags and evidence).

Python API (used by the longitudinal stage)::

    result = score_sites(image, labels, sites, config=load_scoring_config(None))
    result.rows()          # the mocart.csv rows
    result.to_json()       # the mocart.json document

``sites`` is an integer array in the image's grid (0 = none, k = site k), a list of boolean
masks, or a list of :class:`SiteSpec` (bone-surface points or a centre + radius in LPS mm,
e.g. baseline defects carried onto a follow-up through a registration).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, model_validator

from cartiq.config import Strict, config_hash, load_config, resolved
from cartiq.errors import InputError
from cartiq.io.volume import Geometry, Volume, atomic_write_text, check_same_geometry, read_volume
from cartiq.io.labels import default_scheme
from cartiq.scoring.columns import column_profiles, make_frame, sample_columns
from cartiq.scoring.items import MeasurementConfig, site_measures
from cartiq.scoring.sites import (LazyDiameters, SiteSpec, bone_normal, footprint_from_points,
                                   footprint_from_samples, index_crop_getter, plate_near,
                                   site_inputs, sites_from_defects_csv, sites_from_scan_result)
from cartiq.io.outputs import begin_folder, provenance, read_manifest, write_csv, write_manifest

__all__ = ["ScoringConfig", "MeasurementConfig", "SiteSpec", "ItemScore", "SiteScore",
           "ScoreResult", "ScoreRun", "score_sites", "run_score", "load_scoring_config",
           "sites_from_defects_csv", "sites_from_scan_result", "CSV_COLUMNS"]

log = logging.getLogger(__name__)

CSV_COLUMNS = ["site_id", "item", "measure", "value", "unit", "category", "points",
               "max_points", "automation"]
NAN = float("nan")


# ----------------------------------------------------------------------------- config


class Condition(Strict):
    """``measure`` compared with bounds; all given bounds must hold (NaN never holds)."""

    measure: str
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> "Condition":
        if all(x is None for x in (self.gt, self.ge, self.lt, self.le)):
            raise ValueError(f"condition on {self.measure!r} needs gt, ge, lt or le")
        return self

    def holds(self, measures: dict[str, float]) -> bool:
        x = measures.get(self.measure, NAN)
        if x is None or not math.isfinite(x):
            return False
        return ((self.gt is None or x > self.gt) and (self.ge is None or x >= self.ge)
                and (self.lt is None or x < self.lt) and (self.le is None or x <= self.le))


class Category(Strict):
    name: str
    points: float = Field(ge=0)
    when: list[Condition] = Field(default_factory=list,
        description="all must hold; empty = fallback (must be last)")
    verified: bool = Field(False, description="checked against the cited publication")
    note: str = ""


class ItemConfig(Strict):
    title: str
    measure: str = Field(description="the measured quantity shown in the CSV value column")
    unit: str
    automation: Literal["auto", "semi", "not_assessed"]
    max_points: float = Field(ge=0)
    source: str
    categories: list[Category] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "ItemConfig":
        if self.automation == "not_assessed":
            return self
        if not self.categories or self.categories[-1].when:
            raise ValueError(f"{self.title}: the last category must be a fallback (no 'when')")
        if any(not c.when for c in self.categories[:-1]):
            raise ValueError(f"{self.title}: only the last category may have no 'when'")
        if max(c.points for c in self.categories) != self.max_points:
            raise ValueError(f"{self.title}: max_points differs from the best category")
        return self


class ScoringConfig(Strict):
    name: str
    reference: str
    max_total_points: float
    measurement: MeasurementConfig = MeasurementConfig()
    items: dict[str, ItemConfig]

    @model_validator(mode="after")
    def _total(self) -> "ScoringConfig":
        s = sum(i.max_points for i in self.items.values())
        if abs(s - self.max_total_points) > 1e-9:
            raise ValueError(f"items' max_points add up to {s}, not {self.max_total_points}")
        return self


def load_scoring_config(path: str | Path | None) -> ScoringConfig:
    """Validate a scoring YAML (default ``configs/mocart2.yaml``)."""
    return load_config(path, ScoringConfig, default_name="mocart2.yaml")


# ----------------------------------------------------------------------------- records


@dataclass
class ItemScore:
    item: str
    measure: str
    value: float
    unit: str
    category: str
    points: float
    max_points: float
    automation: str
    confidence: str = "high"
    confidence_reasons: list[str] = field(default_factory=list)

    def row(self, site_id: int) -> dict[str, Any]:
        return {"site_id": site_id, "item": self.item, "measure": self.measure,
                "value": self.value, "unit": self.unit, "category": self.category,
                "points": self.points, "max_points": self.max_points,
                "automation": self.automation}


@dataclass
class SiteScore:
    site_id: int
    plate: str | None
    source: str
    items: list[ItemScore]
    total: float
    max_total: float
    measures: dict[str, float] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class ScoreResult:
    config: ScoringConfig
    sites: list[SiteScore]
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for s in self.sites:
            out += [it.row(s.site_id) for it in s.items]
            auto = {it.automation for it in s.items if it.automation != "not_assessed"}
            out.append({"site_id": s.site_id, "item": "total", "measure": "score",
                        "value": s.total, "unit": "points", "category": "",
                        "points": s.total, "max_points": s.max_total,
                        "automation": auto.pop() if len(auto) == 1 else "semi"})
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "score": self.config.name, "reference": self.config.reference,
            "config_hash": config_hash(self.config), "columns": CSV_COLUMNS,
            "notes": self.notes,
            "sites": [{
                "site_id": s.site_id, "plate": s.plate, "source": s.source,
                "total": _clean(s.total), "max_total": s.max_total, "notes": s.notes,
                "total_of_measured": _clean(float(sum(i.points for i in s.items
                                                      if math.isfinite(i.points)))),
                "max_of_measured": float(sum(i.max_points for i in s.items
                                             if math.isfinite(i.points))),
                "items": [{**{k: _clean(v) for k, v in it.row(s.site_id).items()},
                           "confidence": it.confidence,
                           "confidence_reasons": it.confidence_reasons} for it in s.items],
                "measures": {k: _clean(v) for k, v in s.measures.items()},
                "evidence": _clean(s.evidence),
            } for s in self.sites],
        }


def _clean(x: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, floats rounded, numpy scalars to Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return round(float(x), 4) if math.isfinite(x) else None
    return x


# ----------------------------------------------------------------------------- scoring


def _categorize(item: ItemConfig, measures: dict[str, float]) -> tuple[str, float]:
    if item.automation == "not_assessed":
        return "not assessed (not visible in the images)", NAN
    for cat in item.categories[:-1]:
        if all(c.holds(measures) for c in cat.when):
            return cat.name, cat.points
    if not math.isfinite(measures.get(item.measure, NAN)):
        return "not measurable", NAN
    return item.categories[-1].name, item.categories[-1].points


_INTENSITY = {"signal_ratio", "heterogeneity_ratio"}


def _confidence(name: str, item: ItemConfig, m: dict[str, float], ev: dict[str, Any],
                p: MeasurementConfig) -> list[str]:
    why = []
    if m.get("site_area_mm2", 0) < p.min_site_area_mm2:
        why.append(f"site small ({m.get('site_area_mm2', 0):.1f} mm2 < {p.min_site_area_mm2})")
    cols = max(ev.get("site_columns", 0), 1)
    if ev.get("site_columns_with_bone", 0) / cols < p.min_bone_column_fraction:
        why.append("bone surface found under only "
                   f"{100 * ev.get('site_columns_with_bone', 0) / cols:.0f}% of the site")
    if ev.get("ring_area_mm2", 0) < p.min_ring_area_mm2:
        why.append(f"native reference ring small ({ev.get('ring_area_mm2', 0):.1f} mm2)")
    elif ev.get("ring_coverage", 0) < p.min_ring_coverage:
        why.append(f"native cartilage around only {100 * ev.get('ring_coverage', 0):.0f}% "
                   "of the site (plate edge or denuded surroundings)")
    if ev.get("max_spacing_mm", 0) > p.max_spacing_mm and item.measure not in _INTENSITY:
        why.append(f"coarse voxels ({ev['max_spacing_mm']:.2g} mm): geometry approximate")
    if item.measure in _INTENSITY and not ev.get("image_used", True):
        why.append("no image: intensities not measured")
    elif item.measure in _INTENSITY:
        if ev.get("native_voxels", 0) < p.min_native_voxels:
            why.append(f"few native reference voxels ({ev.get('native_voxels', 0):.0f})")
        if ev.get("repair_voxels", 0) < p.min_repair_voxels and m.get("fill_pct", 0) >= 10:
            why.append(f"few repair voxels ({ev.get('repair_voxels', 0):.0f})")
    return why


def _score_items(cfg: ScoringConfig, m: dict[str, float], ev: dict[str, Any]) -> list[ItemScore]:
    out = []
    for name, item in cfg.items.items():
        cat, pts = _categorize(item, m)
        why = ([] if item.automation == "not_assessed"
               else _confidence(name, item, m, ev, cfg.measurement))
        out.append(ItemScore(name, item.measure, float(m.get(item.measure, NAN)), item.unit, cat,
                             pts, item.max_points, item.automation,
                             "low" if why or not math.isfinite(pts) else "high", why))
    return out


def _total(items: list[ItemScore]) -> tuple[float, float]:
    scored = [i for i in items if i.automation != "not_assessed"]
    mx = float(sum(i.max_points for i in scored))
    if any(not math.isfinite(i.points) for i in scored):
        return NAN, mx
    return float(sum(i.points for i in scored)), mx


def _unscorable(cfg: ScoringConfig, site_id: int, plate: str | None, source: str,
                note: str) -> SiteScore:
    items = [ItemScore(n, it.measure, NAN, it.unit, note if it.automation != "not_assessed"
                       else "not assessed (not visible in the images)", NAN, it.max_points,
                       it.automation, "low", [note]) for n, it in cfg.items.items()]
    _, mx = _total(items)
    return SiteScore(site_id, plate, source, items, NAN, mx, notes=[note])


def _score_one(image: Volume | None, labels: np.ndarray, geom: Geometry, sid: int, spec: Any,
               cfg: ScoringConfig, comps: dict[str, tuple[np.ndarray, LazyDiameters]]
               ) -> SiteScore:
    p = cfg.measurement
    scheme = default_scheme()
    is_points = isinstance(spec, SiteSpec)
    source = spec.source if is_points else "mask"
    if is_points:
        pts = np.atleast_2d(np.asarray(spec.points_world, float))
        idx = np.unique(np.clip(np.round(geom.world_to_index(pts)).astype(int), 0,
                                np.asarray(labels.shape) - 1), axis=0)
        center = pts.mean(0)
        r_site = float(np.sqrt(((pts - center) ** 2).sum(-1)).max()) + spec.radius_mm
        plate = spec.plate or plate_near(labels, geom, idx, p.plate_search_mm + spec.radius_mm)
    else:
        idx = spec
        if len(idx) == 0:
            return _unscorable(cfg, sid, None, source, "site mask is empty")
        world = geom.index_to_world(idx)
        center = world.mean(0)
        r_site = float(np.sqrt(((world - center) ** 2).sum(-1)).max())
        plate = plate_near(labels, geom, idx, p.plate_search_mm)
    if plate is None or plate not in scheme.plates:
        return _unscorable(cfg, sid, None, source, "site outside any cartilage plate")
    bone_val = scheme[scheme.plates[plate]]
    own_bml = comps["bml"][1].in_bone(labels, bone_val) if "bml" in comps else []
    plate_val = scheme[plate]
    if r_site > p.max_site_radius_mm:
        return _unscorable(cfg, sid, plate, source, f"site radius {r_site:.1f} mm > "
                           f"max_site_radius_mm {p.max_site_radius_mm}")
    R = r_site + p.ring_gap_mm + p.ring_width_mm + 2 * p.grid_mm
    normal = bone_normal(labels, geom, center, R, [bone_val], plate_val)
    if normal is None:
        return _unscorable(cfg, sid, plate, source, "no bone surface with cartilage near the site")
    frame = make_frame(center, normal)

    def bone_ind(sl: tuple[slice, ...]) -> np.ndarray:   # the bone and its own BMLs
        ind = labels[sl] == bone_val
        if own_bml:
            ind |= np.isin(comps["bml"][0][sl], own_bml)
        return ind.astype(np.float32)

    arrays: dict[str, Any] = {
        "bone": (bone_ind, 1), "cart": (lambda sl: (labels[sl] == plate_val).astype(np.float32), 1)}
    if image is not None:
        arrays["image"] = (lambda sl: image.array[sl].astype(np.float32), 1)
    if not is_points:
        arrays["site"] = (index_crop_getter(idx), 0)
    for name, (cc, _) in comps.items():
        arrays[f"{name}_cc"] = ((lambda a: lambda sl: a[sl].astype(np.float64))(cc), 0)
    cols = sample_columns(frame, R, (-p.bone_depth_mm, p.max_height_mm), p.grid_mm, p.step_mm,
                          geom.world_to_index, labels.shape, arrays)
    prof = column_profiles(cols, bone_margin_mm=p.bone_margin_mm,
                           max_cart_height_mm=p.max_cart_height_mm)
    foot = (footprint_from_points(cols, pts, spec.radius_mm, p.closing_mm) if is_points
            else footprint_from_samples(cols, p.closing_mm))
    if not foot.any():
        return _unscorable(cfg, sid, plate, source, "site footprint is empty")
    m, ev = site_measures(cols, prof, foot, p, has_image=image is not None,
                          diameters={"bml": comps["bml"][1].only(own_bml) if own_bml else {},
                                     **({"cyst": comps["cyst"][1]} if "cyst" in comps else {})},
                          voxel_volume_mm3=geom.voxel_volume_mm3)
    ev.update({"frame_center_lps_mm": [round(float(x), 3) for x in center],
               "frame_normal_lps": [round(float(x), 5) for x in normal],
               "column_radius_mm": round(R, 3), "image_used": image is not None,
               "max_spacing_mm": float(max(geom.spacing)),
               **({"site_info": spec.info} if is_points and spec.info else {})})
    items = _score_items(cfg, m, ev)
    total, mx = _total(items)
    notes = []
    if not math.isfinite(m.get("cyst_diameter_mm", NAN)):
        notes.append("subchondral cysts not assessed (measurement.cyst_intensity_ratio unset)")
    return SiteScore(sid, plate, source, items, total, mx, m, ev, notes)


def score_sites(image: Volume | None, labels: np.ndarray, sites: Any, *,
                config: ScoringConfig | None = None, scan_result: Any = None,
                geometry: Geometry | None = None) -> ScoreResult:
    """Score every repair site.

    Parameters
    ----------
    image : the scan (intensity items need it; ``None`` leaves them "not measurable").
    labels : cartiq-scheme label map in the image's grid (ITK index order).
    sites : integer array (0 none, k site k) in that grid, a list of boolean masks, or a list
        of :class:`SiteSpec`; ``None`` takes the defects of ``scan_result``.
    config : scoring config (default ``configs/mocart2.yaml``).
    scan_result : a :class:`cartiq.measurement.measure.MeasureResult` whose defects (per-vertex
        ``defect_id``) become sites when ``sites`` is ``None``.
    geometry : the grid, when ``image`` is ``None``.
    """
    cfg = config or load_scoring_config(None)
    geom = image.geometry if image is not None else geometry
    if geom is None:
        raise InputError("score_sites needs an image or a geometry")
    if tuple(labels.shape) != tuple(geom.shape):
        raise InputError(f"label map shape {labels.shape} differs from the image {geom.shape}")
    if sites is None and scan_result is not None:
        sites = sites_from_scan_result(scan_result)
    specs = site_inputs(sites, labels.shape)
    notes = [] if specs else ["no repair sites given or found; nothing scored"]
    comps: dict[str, tuple[np.ndarray, LazyDiameters]] = {}
    if specs:
        import cc3d

        scheme = default_scheme()
        bml = labels == scheme["bone_marrow_lesion"]
        if bml.any():
            cc = cc3d.connected_components(bml, connectivity=26).astype(np.int32)
            comps["bml"] = (cc, LazyDiameters(cc, geom))
        ratio = cfg.measurement.cyst_intensity_ratio
        if ratio is not None and image is not None:
            bones = np.isin(labels, [scheme[b] for b in scheme.bones])
            if bones.any():
                ref = float(np.median(image.array[bones]))
                cand = bones & (image.array > ratio * ref)
                cc = cc3d.connected_components(cand, connectivity=26).astype(np.int32)
                cc = cc3d.dust(cc, threshold=cfg.measurement.cyst_min_voxels, connectivity=26)
                comps["cyst"] = (cc, LazyDiameters(cc, geom))
    out = [_score_one(image, labels, geom, sid, spec, cfg, comps) for sid, spec in specs]
    return ScoreResult(cfg, out, notes)


# ----------------------------------------------------------------------------- files


@dataclass
class ScoreRun:
    out_dir: Path
    result: ScoreResult


def _default_sites(scan_dir: Path, manifest: dict[str, Any], seg: Volume
                   ) -> tuple[list[SiteSpec], str]:
    """The scan's own defects: their vertex patches when re-measuring the segmentation
    reproduces ``defects.csv`` (same ids, plates and centroids), else discs of their area."""
    dcsv = scan_dir / "defects.csv"
    discs = sites_from_defects_csv(dcsv) if dcsv.is_file() else []
    if not discs:
        return [], str(dcsv)
    try:
        from cartiq.config import MeasureConfig
        from cartiq.measurement.measure import measure_labels

        from cartiq.measurement.store import load_if_current

        mcfg_path = scan_dir / "config.yaml"
        mcfg = load_config(mcfg_path, MeasureConfig) if mcfg_path.is_file() else MeasureConfig()
        res = load_if_current(scan_dir, seg.geometry, side=manifest.get("side"),
                              config_hash=config_hash(mcfg))
        if res is None:
            res = measure_labels(seg.array, seg.geometry, side=manifest.get("side"), config=mcfg)
        patches = {s.site_id: s for s in sites_from_scan_result(res)}
        ok = all(d.site_id in patches and patches[d.site_id].plate == d.plate and np.linalg.norm(
            patches[d.site_id].points_world.mean(0) - d.points_world[0]) <= max(2.0, d.radius_mm)
            for d in discs)
    except Exception as exc:  # noqa: BLE001 - any failure falls back to the discs
        log.warning("re-measuring %s failed (%s); defects scored as discs", scan_dir, exc)
        ok = False
    if ok:
        return [replace(patches[d.site_id], info=d.info) for d in discs], f"{dcsv} (patches)"
    log.info("defect patches not reproducible; scoring defects.csv rows as discs")
    return discs, f"{dcsv} (discs of the defect area)"


def run_score(scan_dir: str | Path, out_dir: str | Path, *, sites_path: str | Path | None = None,
              config_path: str | Path | None = None) -> ScoreRun:
    """Score the repair sites of a finished ``cartiq measure``/``run`` folder into ``out_dir``.

    Writes ``mocart.csv``, ``mocart.json``, ``mocart_config.yaml`` and, last, ``manifest.json``.
    """
    scan_dir, out_dir = Path(scan_dir), Path(out_dir)
    manifest = read_manifest(scan_dir)
    if out_dir.resolve() == scan_dir.resolve():
        raise InputError("write the scores to another folder than the scan folder", out_dir)
    img_info = (manifest.get("inputs") or {}).get("image") or {}
    cfg = load_scoring_config(config_path)
    seg_path = scan_dir / "segmentation.nii.gz"
    seg = read_volume(seg_path, kind="labels")
    image = None
    img_path = Path(str(img_info.get("path", "")))
    if not img_path.is_absolute() and not img_path.exists():
        img_path = scan_dir / img_path
    if img_info.get("path") and img_path.exists():
        image = read_volume(img_path, series=img_info.get("series_instance_uid"),
                            echo=img_info.get("echo"))
        check_same_geometry(seg.geometry, image.geometry, seg_path, img_path)
    else:
        log.warning("%s: image not found; intensity items are not measurable", img_path)
    if sites_path is not None:
        sv = read_volume(sites_path, kind="labels")
        check_same_geometry(seg.geometry, sv.geometry, seg_path, Path(sites_path))
        sites: Any = sv.array
        site_source = str(sites_path)
    else:
        sites, site_source = _default_sites(scan_dir, manifest, seg)
    result = score_sites(image, seg.array, sites, config=cfg, geometry=seg.geometry)
    if not result.sites:
        log.warning("no repair sites in %s: writing an empty table", site_source)
    begin_folder(out_dir, inputs=(scan_dir, sites_path))
    doc = {**provenance(), **result.to_json(), "scan_dir": str(scan_dir),
           "sites_from": site_source}
    write_csv(out_dir / "mocart.csv", CSV_COLUMNS, result.rows())  # not measured: empty cell
    atomic_write_text(out_dir / "mocart.json", json.dumps(doc, indent=1, allow_nan=False))
    atomic_write_text(out_dir / "mocart_config.yaml",
                      yaml.safe_dump(resolved(cfg), sort_keys=False))
    write_manifest(out_dir, {
        "stage": "score", "inputs": {"scan_dir": str(scan_dir), "sites": site_source},
        "config": resolved(cfg), "config_hash": config_hash(cfg), "n_sites": len(result.sites),
        "outputs": ["mocart.csv", "mocart.json", "mocart_config.yaml"]})
    return ScoreRun(out_dir, result)
