"""Per-scan quality control: automatic flags and the ``qc.png`` review figure.

Flags (each a :class:`QCFlag` with a code, a severity and a message naming the structure):

``plate_empty`` (error)        a cartilage plate has no voxels.
``plate_small`` (warning)      a plate's volume is below ``min_plate_volume_mm3``.
``plate_volume`` (warning)     a plate's volume is plausible but outside its typical adult
                               range (``typical_plate_volume_mm3``): look at the overlay - a
                               network that adds cartilage where there is none (or misses
                               some) can stay inside the plausible range.
``plate_volume`` (error)       a plate's volume is outside its plausible adult range
                               (``plausible.plate_volume_mm3``; sources in ``configs/qc.yaml``).
``thickness_range`` (error)    a plate's mean thickness is outside its plausible adult range
                               (``plausible.mean_thickness_mm``); (warning) its 99th
                               percentile exceeds ``max_thickness_mm``.
``bml_volume`` (error)         bone-marrow lesions larger than ``plausible.max_bml_volume_mm3``
                               or filling more than ``plausible.max_bml_bone_fraction`` of a bone.
``border`` (error/warning)     more than ``plausible.max_border_fraction`` of a plate lies within
                               ``plausible.border_margin_mm`` of the image border (error);
                               cartilage, menisci or lesions touch the border (warning).
``not_adjacent`` (error/warn)  a plate does not touch its bone, or more than
                               ``plausible.max_far_fraction`` of it lies farther than
                               ``max_distance_to_bone_mm`` from it (error); more than
                               ``max_far_fraction`` does (warning); lesions outside bone.
``position`` (warning)         labels in implausible places: lateral tibial plate on the medial
                               side, femoral cartilage below the tibial plates, patellar
                               cartilage behind the femoral cartilage.
``bone_missing`` (warning)     a plate's bone is not labelled, so adjacency is not checked.
``bone_grey`` (warning)        with the image: a bone's label covers more than
                               ``bone_grey.max_volume_mm3`` on slices whose bone voxels are
                               mostly far brighter than that bone's core - drawn over fluid
                               beyond the bone (:mod:`cartiq.measurement.qc_image`).
``registration`` (warning)     longitudinal only: registration residual above
                               ``max_registration_residual_mm``.

The figure (drawn by :mod:`cartiq.measurement.qc_figure`) has one row per cartilage plate:
the label outlines over the image on the three planes through the plate's centroid (the index planes closest to sagittal, coronal and
axial, shown in radiological orientation with millimetre aspect), and the plate's thickness
map in 2D with a colour bar in mm (drawing in :mod:`cartiq.measurement.qc_maps`: femur unrolled as
the angle around the left-right axis through the condyles against the left-right position;
tibia projected on the axial plane; patella on the coronal plane).  Defects
(``D<id>``) and bone-marrow lesions (``B<id>``) are marked on the maps and outlined on the
slices.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import Field
from scipy import ndimage

from cartiq.config import Strict, load_config
from cartiq.io.volume import Geometry, Volume, read_volume
from cartiq.io.labels import PLATES, default_scheme, label_counts, lateral_sign, plate_boxes
from cartiq.measurement.qc_figure import image_on_grid, qc_figure as _qc_figure
from cartiq.measurement.qc_image import BoneGreyLimits, bone_grey_problems
from cartiq.measurement.qc_ranges import (PlausibleRanges, bml_problems, border_fraction,
                                          range_problems, typical_volume_problem)
from cartiq.measurement.qc_maps import PlateMap, plate_map_from_points, projector_for

__all__ = ["QCConfig", "QCFlag", "QCResult", "qc_checks", "load_qc_config", "registration_flag", "write_qc",
           "recheck_qc", "read_table"]

log = logging.getLogger(__name__)


class QCConfig(Strict):
    min_plate_volume_mm3: dict[str, float] = Field(
        default_factory=lambda: {"femoral_cartilage": 1000.0, "medial_tibial_cartilage": 150.0,
                                 "lateral_tibial_cartilage": 150.0, "patellar_cartilage": 150.0})
    max_thickness_mm: float = Field(8.0, gt=0, description="99th percentile limit")
    max_distance_to_bone_mm: float = Field(8.0, gt=0)
    max_far_fraction: float = Field(0.05, ge=0, le=1)
    max_registration_residual_mm: float = Field(1.0, gt=0)
    typical_plate_volume_mm3: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"femoral_cartilage": (6000.0, 15000.0)},
        description="warning outside [min, max] (inside the plausible range); sourced plates only")
    min_bone_volume_mm3: dict[Literal["femur", "tibia", "patella"], float] = Field(
        default_factory=lambda: {"patella": 8000.0},
        description="bone_small (warning): a bone below this volume is drawn in part or in "
                    "pieces; only bones a knee scan holds whole")
    figure_dpi: int = Field(80, ge=30, le=300)
    map_vmax_mm: float = Field(4.0, gt=0, description="upper end of the thickness colour bar")
    plausible: PlausibleRanges = Field(default_factory=PlausibleRanges)
    bone_grey: BoneGreyLimits = Field(default_factory=BoneGreyLimits)


def load_qc_config(path: Path | None = None) -> QCConfig:
    """QC limits from ``path`` or ``configs/qc.yaml``."""
    return load_config(path, QCConfig, default_name="qc.yaml")


@dataclass
class QCFlag:
    code: str
    severity: str  # "warning" | "error"
    structure: str
    message: str
    value: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "structure": self.structure,
                "message": self.message,
                "value": None if self.value is None else round(float(self.value), 4)}


@dataclass
class QCResult:
    flags: list[QCFlag] = field(default_factory=list)
    figure: Path | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if any(f.severity == "error" for f in self.flags):
            return "fail"
        return "warn" if self.flags else "pass"

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "n_flags": len(self.flags),
                "flags": [f.to_json() for f in self.flags],
                "figure": None if self.figure is None else self.figure.name,
                "figure_errors": list(self.errors)}


# ---------------------------------------------------------------------------- checks


def _marginals(mask: np.ndarray) -> list[np.ndarray]:
    return [mask.sum(axis=tuple(b for b in range(3) if b != a)) for a in range(3)]


def _grow(box: tuple[slice, ...], pad: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A bounding box grown by ``pad`` voxels per axis, clipped to the array."""
    return tuple(slice(max(b.start - int(p), 0), min(b.stop + int(p), n))
                 for b, p, n in zip(box, pad, shape))


def _centroid_world(mask: np.ndarray, geometry: Geometry,
                    start: tuple[int, ...] = (0, 0, 0)) -> np.ndarray | None:
    """World centroid of ``mask``, a crop of the volume starting at voxel ``start``."""
    margins = _marginals(mask)
    total = margins[0].sum()
    if total == 0:
        return None
    mean = [float((m * np.arange(s, s + len(m))).sum() / total) for m, s in zip(margins, start)]
    return geometry.index_to_world(np.array(mean))[0]


def _distance_mm(outside: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) of every voxel to the nearest False voxel of ``outside``."""
    try:
        import edt

        return edt.edt(np.ascontiguousarray(outside), anisotropy=tuple(float(s) for s in spacing),
                       black_border=False, parallel=1)
    except ImportError:  # pragma: no cover - edt is a dependency; scipy is the fallback
        return ndimage.distance_transform_edt(outside, sampling=spacing)


def _adjacency_flags(name: str, value: int, box: tuple[slice, ...], labels: np.ndarray,
                     bone_values: list[int], spacing: np.ndarray, cfg: QCConfig) -> list[QCFlag]:
    """Adjacency of the plate labelled ``value`` (bounding box ``box``) to its bone."""
    pad = np.ceil((cfg.max_distance_to_bone_mm + 2) / spacing).astype(int)
    sub = labels[_grow(box, pad, labels.shape)]
    c, b = sub == value, np.isin(sub, bone_values)
    if not b.any():
        return [QCFlag("not_adjacent", "error", name,
                       f"{name} lies farther than {cfg.max_distance_to_bone_mm:g} mm from its bone")]
    dist = _distance_mm(~b, spacing)[c]
    touching = float(dist.min()) <= float(spacing.max()) * 1.01
    if not touching:
        return [QCFlag("not_adjacent", "error", name, f"{name} does not touch its bone "
                       f"(closest {dist.min():.1f} mm)", float(dist.min()))]
    far = float((dist > cfg.max_distance_to_bone_mm).mean())
    if far > cfg.max_far_fraction:
        severity = "error" if far > cfg.plausible.max_far_fraction else "warning"
        return [QCFlag("not_adjacent", severity, name,
                       f"{100 * far:.0f}% of {name} lies more than "
                       f"{cfg.max_distance_to_bone_mm:g} mm from its bone", far)]
    return []


def _border_counts(labels: np.ndarray, n: int) -> np.ndarray:
    """Voxels per label value on the faces of the volume (the six faces, each voxel once)."""
    if min(labels.shape) <= 2:
        return label_counts(labels, n)
    faces = (labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1],
             labels[1:-1, 1:-1, 0], labels[1:-1, 1:-1, -1])
    return sum(label_counts(f, n) for f in faces)


def _thickness_values(name: str, mask: np.ndarray, thickness: np.ndarray | None,
                      result: Any) -> tuple[np.ndarray, np.ndarray]:
    """Thickness values (mm) and weights: the covered surface (area-weighted, as
    ``measurements.csv``) when ``result`` has it, else the voxel map (equal weights)."""
    plate = getattr(result, "plates", {}).get(name) if result is not None else None
    if plate is not None and getattr(plate, "present", False) and len(plate.thickness_mm):
        cov = np.asarray(plate.covered, bool)
        t = np.asarray(plate.thickness_mm, float)[cov]
        w = np.asarray(plate.vertex_area_mm2, float)[cov]
        ok = np.isfinite(t)
        return t[ok], w[ok]
    if thickness is None:
        return np.zeros(0), np.zeros(0)
    t = thickness[mask]
    t = t[np.isfinite(t) & (t > 0)]
    return t, np.ones_like(t)


def _boxes(labels: np.ndarray, result: Any) -> dict[str, tuple[slice, ...] | None]:
    """The plate boxes ``result`` (a :class:`~cartiq.measurement.records.MeasureResult` of
    ``labels``) carries, else one pass over ``labels``."""
    boxes = getattr(result, "plate_boxes", None)
    return boxes if boxes is not None else plate_boxes(labels)


def qc_checks(labels: np.ndarray, geometry: Geometry, *, side: str | None = None,
              thickness: np.ndarray | None = None, result: Any = None,
              config: QCConfig | None = None,
              mean_thickness_mm: dict[str, float] | None = None,
              image: np.ndarray | None = None) -> list[QCFlag]:
    """Automatic QC flags of one label map (cartiq scheme); see the module docstring.

    Parameters
    ----------
    labels : label array, ITK index order.
    geometry : its grid (spacing mm, LPS direction).
    side : knee side, for the medial/lateral position check (skipped when None).
    thickness : voxel thickness map (mm, 0 outside cartilage), or ``result`` (a
        :class:`cartiq.measurement.measure.MeasureResult`) whose surface thickness is preferred.
    mean_thickness_mm : per plate, the mean thickness to check against the plausible range
        (``measurements.csv``); otherwise computed from ``result`` or ``thickness``.
    image : the scan on the labels' grid, for the checks that read it (``bone_grey``);
        None skips them.
    """
    cfg = config or load_qc_config()
    scheme = default_scheme()
    spacing = np.asarray(geometry.spacing, float)
    vox = geometry.voxel_volume_mm3
    flags: list[QCFlag] = []
    counts = label_counts(labels, minlength=max(scheme.values) + 1)
    boxes = _boxes(labels, result)
    centroids: dict[str, np.ndarray | None] = {}
    for name in PLATES:
        n = int(counts[scheme[name]])
        volume = n * vox
        if n == 0:
            flags.append(QCFlag("plate_empty", "error", name, f"{name} is empty", 0.0))
            continue
        box = boxes[name]
        mask = labels[box] == scheme[name]
        centroids[name] = _centroid_world(mask, geometry, tuple(b.start for b in box))
        limit = cfg.min_plate_volume_mm3.get(name, 0.0)
        if volume < limit:
            flags.append(QCFlag("plate_small", "warning", name,
                                f"{name} volume {volume:.0f} mm3 < {limit:g} mm3", volume))
        t, w = _thickness_values(name, mask, None if thickness is None else thickness[box],
                                 result)
        mean = float(np.average(t, weights=w)) if t.size and w.sum() > 0 else None
        if mean_thickness_mm and np.isfinite(mean_thickness_mm.get(name, np.nan)):
            mean = float(mean_thickness_mm[name])
        problems = range_problems(name, volume, mean, cfg.plausible)
        flags += [QCFlag(code, "error", name, msg, v) for code, msg, v in problems]
        typical = typical_volume_problem(name, volume, cfg.typical_plate_volume_mm3)
        if typical and not any(code == "plate_volume" for code, _, _ in problems):
            flags.append(QCFlag(typical[0], "warning", name, typical[1], typical[2]))
        if t.size and not any(code == "thickness_range" for code, _, _ in problems):
            p99 = float(np.percentile(t, 99))
            if p99 > cfg.max_thickness_mm:
                flags.append(QCFlag("thickness_range", "warning", name,
                                    f"{name} 99th percentile thickness {p99:.1f} mm > "
                                    f"{cfg.max_thickness_mm:g} mm", p99))
        bone_name = scheme.plates[name]
        if counts[scheme[bone_name]] == 0:
            flags.append(QCFlag("bone_missing", "warning", name,
                                f"{bone_name} not labelled: adjacency of {name} not checked"))
        else:
            flags += _adjacency_flags(name, scheme[name], box, labels,
                                      [scheme[bone_name], scheme["bone_marrow_lesion"]],
                                      spacing, cfg)
    for bone, limit in cfg.min_bone_volume_mm3.items():
        volume = int(counts[scheme[bone]]) * vox
        if volume < limit:
            flags.append(QCFlag("bone_small", "warning", bone,
                                f"{bone} volume {volume:.0f} mm3 < {limit:g} mm3: drawn in part "
                                "or in pieces? check the overlay", volume))
    on_border = _border_counts(labels, len(counts))
    for name in PLATES + ("medial_meniscus", "lateral_meniscus", "bone_marrow_lesion"):
        if not (n := int(on_border[scheme[name]])):
            continue
        frac = border_fraction(labels == scheme[name], geometry, cfg.plausible.border_margin_mm) \
            if name in PLATES else 0.0
        if frac > cfg.plausible.max_border_fraction:
            flags.append(QCFlag("border", "error", name, f"{100 * frac:.0f}% of {name} lies "
                                f"within {cfg.plausible.border_margin_mm:g} mm of the image "
                                "border: mostly cut off or not cartilage", frac))
        else:
            flags.append(QCFlag("border", "warning", name,
                                f"{name} touches the image border ({n} voxels): cut off?", n))
    if counts[scheme["bone_marrow_lesion"]]:  # (no lesion voxel: no lesion flag)
        flags += [QCFlag("bml_volume", "error", where, msg, v) for where, msg, v in
                  bml_problems(labels, scheme["bone_marrow_lesion"],
                               {b: scheme[b] for b in ("femur", "tibia", "patella")}, vox,
                               cfg.plausible)]
        bml = labels == scheme["bone_marrow_lesion"]
        bones = np.isin(labels, [scheme[b] for b in scheme.bones])
        grown = ndimage.binary_dilation(bones, iterations=1)
        comps, n = ndimage.label(bml)
        outside = n - len(np.unique(comps[grown & bml]))
        if outside > 0:
            flags.append(QCFlag("not_adjacent", "warning", "bone_marrow_lesion",
                                f"{outside} bone-marrow lesion(s) not inside or against a bone",
                                outside))
    flags += _position_flags(centroids, side)
    if image is not None:
        bones = {b: scheme[b] for b in scheme.bones if counts[scheme[b]]}
        flags += [QCFlag("bone_grey", "warning", bone, msg, v) for bone, msg, v in
                  bone_grey_problems(np.asarray(image), labels, geometry, bones, cfg.bone_grey)]
    return flags


def _position_flags(c: dict[str, np.ndarray | None], side: str | None) -> list[QCFlag]:
    flags = []
    med, lat = c.get("medial_tibial_cartilage"), c.get("lateral_tibial_cartilage")
    if side in ("left", "right") and med is not None and lat is not None:
        if (lat[0] - med[0]) * lateral_sign(side) < 0:
            flags.append(QCFlag("position", "warning", "lateral_tibial_cartilage",
                                f"lateral tibial plate lies medial to the medial one for a "
                                f"{side} knee (swapped labels or wrong side?)"))
    fem = c.get("femoral_cartilage")
    tib = [p for p in (med, lat) if p is not None]
    if fem is not None and tib and fem[2] < min(p[2] for p in tib):
        flags.append(QCFlag("position", "warning", "femoral_cartilage",
                            "femoral cartilage lies below the tibial cartilage "
                            "(upside-down orientation header?)"))
    pat = c.get("patellar_cartilage")
    if fem is not None and pat is not None and pat[1] > fem[1]:
        flags.append(QCFlag("position", "warning", "patellar_cartilage",
                            "patellar cartilage lies posterior to the femoral cartilage "
                            "(mislabelled or wrong orientation header?)"))
    return flags


def registration_flag(residual_mm: float | None, config: QCConfig | None = None) -> list[QCFlag]:
    """Longitudinal QC: flag a baseline/follow-up registration residual above the limit."""
    cfg = config or QCConfig()
    if residual_mm is None or not np.isfinite(residual_mm):
        return []
    if residual_mm > cfg.max_registration_residual_mm:
        return [QCFlag("registration", "warning", "registration",
                       f"registration residual {residual_mm:.2f} mm > "
                       f"{cfg.max_registration_residual_mm:g} mm: change maps unreliable",
                       residual_mm)]
    return []


# ---------------------------------------------------------------------------- files


def read_table(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file ([] if missing or unreadable)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except OSError:
        return []


def markers(scan_dir: Path, result: Any) -> tuple[list[dict], list[dict]]:
    """Defect and lesion markers: dicts with id, plate/bone, kind, world centroid."""
    if result is not None:
        defects = [{"id": d.id, "plate": d.plate, "kind": d.kind,
                    "xyz": np.asarray(d.centroid_world, float)} for d in result.defects]
        lesions = [{"id": l.id, "bone": l.bone, "xyz": np.asarray(l.centroid_world, float)}
                   for l in result.lesions]
        return defects, lesions

    def xyz(row: dict[str, str]) -> np.ndarray:
        return np.array([float(row.get(f"centroid_{a}_mm") or "nan") for a in "xyz"])

    defects = [{"id": r.get("defect_id"), "plate": r.get("plate"), "kind": r.get("kind"),
                "xyz": xyz(r)} for r in read_table(scan_dir / "defects.csv")]
    lesions = [{"id": r.get("lesion_id"), "bone": r.get("bone"), "xyz": xyz(r)}
               for r in read_table(scan_dir / "lesions.csv")]
    return defects, lesions


def read_manifest(scan_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((scan_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _load_image(manifest: dict[str, Any]) -> Volume | None:
    info = (manifest.get("inputs") or {}).get("image") or {}
    path = info.get("path")
    if not path:
        return None
    try:
        return read_volume(Path(path), series=info.get("series_number") and str(info["series_number"]),
                           echo=info.get("echo"))
    except Exception as exc:  # the figure falls back to labels only
        log.warning("QC: cannot read the image %s (%s); outlines drawn on labels", path, exc)
        return None


def plate_maps(labels: np.ndarray, geometry: Geometry, values: np.ndarray | None, *,
               result: Any = None, bin_mm: float = 1.0,
               boxes: dict[str, tuple[slice, ...] | None] | None = None) -> dict[str, PlateMap]:
    """2D map per present plate from surface points (``result``) or a voxel value map
    (``boxes``: :func:`cartiq.io.labels.plate_boxes` of ``labels``, if known)."""
    scheme = default_scheme()
    maps: dict[str, PlateMap] = {}
    box = (boxes or plate_boxes(labels))["femoral_cartilage"]
    fem_pts = None
    if box is not None:  # the femoral cartilage's voxels, found on its bounding box
        start = np.array([b.start for b in box])
        fem_pts = geometry.index_to_world(np.argwhere(labels[box] == scheme["femoral_cartilage"])
                                          + start)
    for name in PLATES:
        plate = getattr(result, "plates", {}).get(name) if result is not None else None
        if plate is not None and plate.present and len(plate.points_world):
            pts = np.asarray(plate.points_world, float)
            val = np.where(plate.covered, np.nan_to_num(plate.thickness_mm), np.nan)
            den = np.asarray(plate.denuded, bool)
        else:
            mask = labels == scheme[name]
            if values is None or not mask.any():
                continue
            idx = np.argwhere(mask)
            pts = geometry.index_to_world(idx)
            val = values[tuple(idx.T)].astype(float)
            den = None
        proj = projector_for(name, fem_pts if fem_pts is not None else pts)
        maps[name] = plate_map_from_points(name, pts, val, proj, denuded=den, bin_mm=bin_mm)
    return maps


def write_qc(scan_dir: Path, *, result: Any = None, image: Volume | None = None,
             labels: np.ndarray | None = None, registration_residual_mm: float | None = None,
             config: QCConfig | Path | None = None, figure: bool = True,
             flags: list[QCFlag] | None = None,
             save_figure: Callable[[Path, bytes], Any] | None = None) -> QCResult:
    """Compute the QC flags of a measure folder and write its ``qc.png``.

    Reads what is not given in memory from ``scan_dir``: ``manifest.json`` (image path,
    side), ``segmentation.nii.gz``, ``thickness.nii.gz``, ``defects.csv``, ``lesions.csv``.
    A plotting failure is logged and returned in ``QCResult.errors``; flags are still
    computed.  Missing segmentation raises :class:`cartiq.errors.InputError`.  ``flags``:
    flags computed already (e.g. ``write_qc(..., figure=False).flags``): only drawn.
    ``save_figure(path, png)``: stores the drawn PNG (default: written at once).
    """
    scan_dir = Path(scan_dir)
    cfg = config if isinstance(config, QCConfig) else load_qc_config(config)
    manifest = read_manifest(scan_dir)
    geometry = result.geometry if result is not None else None
    if labels is None:
        seg = read_volume(scan_dir / "segmentation.nii.gz", kind="labels")
        labels, geometry = seg.array, seg.geometry
    if geometry is None:
        geometry = image.geometry if image is not None else \
            read_volume(scan_dir / "segmentation.nii.gz", kind="labels").geometry
    side = getattr(result, "side", None) or manifest.get("side")
    if result is not None:
        thickness = np.asarray(result.thickness_map)
    elif (scan_dir / "thickness.nii.gz").exists():
        thickness = read_volume(scan_dir / "thickness.nii.gz").array
    else:
        thickness = None
    means = None
    if result is None:  # from files: the plate means of measurements.csv
        means = {r["structure"]: float(r["value"] or "nan")
                 for r in read_table(scan_dir / "measurements.csv")
                 if r.get("region") == "all" and r.get("metric") == "thickness_mean"}
    if image is None and (flags is None or figure):  # read once, for the checks and the figure
        image = _load_image(manifest)
    on_grid = image_on_grid(image, labels)
    if image is not None and on_grid is None:
        log.warning("%s: the image (%s voxels) is not on the segmentation's grid (%s): QC's "
                    "image checks (bone_grey) and the figure's background are skipped",
                    scan_dir, "x".join(map(str, image.array.shape)),
                    "x".join(map(str, labels.shape)))
    if flags is None:
        flags = qc_checks(labels, geometry, side=side, thickness=thickness, result=result,
                          config=cfg, mean_thickness_mm=means, image=on_grid)
        flags += registration_flag(registration_residual_mm, cfg)
    out = QCResult(flags=flags)
    if not figure:
        return out
    try:
        defects, lesions = markers(scan_dir, result)
        boxes = _boxes(labels, result)
        maps = plate_maps(labels, geometry, thickness, result=result, boxes=boxes) \
            if thickness is not None or result is not None else {}
        out.figure = _qc_figure(scan_dir / "qc.png", labels, geometry, image, maps, defects,
                                lesions, flags, side, cfg, title=manifest.get("scan_id")
                                or f"{scan_dir.parent.name}/{scan_dir.name}", save=save_figure,
                                boxes=boxes)
    except Exception as exc:  # reports never fail the analysis
        log.warning("QC figure for %s failed: %s", scan_dir, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        out.errors.append(f"{type(exc).__name__}: {exc}"[:300])
    return out


def recheck_qc(scan_dir: Path, *, registration_residual_mm: float | None = None,
               config: QCConfig | Path | None = None) -> QCResult:
    """QC a finished ``cartiq measure``/``run`` folder again (``cartiq qc``: other limits,
    a registration residual) and bring the folder's record up to date with the new status:
    ``qc.png``, the ``qc_status`` column of ``measurements.csv``, the ``qc`` block of
    ``manifest.json`` (with ``rechecked``: the limits file and residual used) and the
    resolved limits in ``qc_config.yaml``; cohort tables and reports read that block.

    Only a complete folder is rechecked (:func:`cartiq.io.outputs.why_incomplete`); the flags
    and the figure (with the image and side the manifest names) are made before anything is
    touched, and the folder is marked incomplete until the new manifest is written, so an
    interrupted recheck is never taken for a finished one."""
    import time

    import yaml

    from cartiq.config import resolved
    from cartiq.errors import InputError
    from cartiq.io.outputs import begin_folder, why_incomplete, write_csv, write_manifest
    from cartiq.io.volume import atomic_write_bytes, atomic_write_text

    scan_dir = Path(scan_dir)
    why = why_incomplete(scan_dir)
    if why is not None:
        raise InputError(f"not a complete cartiq output folder: {why}", scan_dir)
    cfg = config if isinstance(config, QCConfig) else load_qc_config(config)
    manifest = read_manifest(scan_dir)
    table = scan_dir / "measurements.csv"
    columns = rows = None
    if table.is_file():
        with table.open(newline="", encoding="utf-8") as fh:
            columns = list(csv.DictReader(fh).fieldnames or [])
        rows = read_table(table)
        columns += [] if "qc_status" in columns else ["qc_status"]
    figures: list[tuple[Path, bytes]] = []  # drawn now, written once the folder is marked
    result = write_qc(scan_dir, registration_residual_mm=registration_residual_mm, config=cfg,
                      save_figure=lambda path, png: figures.append((path, png)))
    begin_folder(scan_dir, fresh=False)
    for path, png in figures:
        atomic_write_bytes(path, png)
    if rows is not None:
        write_csv(table, columns, [{**r, "qc_status": result.status} for r in rows])
    atomic_write_text(scan_dir / "qc_config.yaml", yaml.safe_dump(resolved(cfg), sort_keys=False))
    manifest["qc"] = {**result.to_json(), "rechecked": {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": str(Path(config).resolve()) if isinstance(config, (str, Path)) else "default",
        "registration_residual_mm": registration_residual_mm}}
    write_manifest(scan_dir, manifest)
    return result
