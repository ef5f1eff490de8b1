"""A scan's measurement, saved with its outputs and read back instead of measuring again.

``measurement.npz`` holds everything later stages need from :class:`MeasureResult`: each
plate's tAB surface (points in LPS mm, faces) with its per-vertex thickness, expected
thickness, covered/denuded flags, areas, subregion codes and defect ids; the defects; the
lesions with their voxel indices; the table rows; the side and the warnings.  It is plain
numpy arrays (no pickle), so loading it cannot run code.  The per-voxel thickness map is
not stored (it is ``thickness.nii.gz``); a loaded result carries an empty one.

Scoring and comparison read it when it was made with the same measurement config and side
that they need (:func:`load_if_current`); otherwise they measure again and log why.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from cartiq.errors import InputError
from cartiq.io.volume import Geometry, atomic_path
from cartiq.measurement.records import Defect, Lesion, MeasureResult, PlateResult

__all__ = ["RESULT_FILE", "save_result", "load_result", "load_if_current"]

log = logging.getLogger(__name__)

RESULT_FILE = "measurement.npz"
_FORMAT = 1
_PLATE_ARRAYS = ("points_world", "faces", "thickness_mm", "expected_thickness_mm", "covered",
                 "denuded", "vertex_area_mm2", "region", "defect_id")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None if np.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _float(x: Any) -> float:
    if x is None:
        return float("nan")
    if isinstance(x, str):
        return float(x)
    return float(x)


def save_result(result: MeasureResult, path: Path, *, config_hash: str) -> Path:
    """Write ``result`` to ``path`` (``measurement.npz``); ``config_hash`` of its config."""
    arrays: dict[str, np.ndarray] = {}
    plates = {}
    for name, p in result.plates.items():
        plates[name] = {"bone": p.bone, "present": p.present, "volume_mm3": p.volume_mm3,
                        "region_volume_mm3": p.region_volume_mm3}
        for key in _PLATE_ARRAYS:
            a = np.asarray(getattr(p, key))
            arrays[f"{name}/{key}"] = a.astype(str) if key == "region" else a
    for les in result.lesions:
        arrays[f"lesion/{les.id}"] = np.asarray(les.mask_index, dtype=np.int32)
    doc = {
        "format": _FORMAT, "config_hash": config_hash, "side": result.side,
        "geometry": result.geometry.to_json(), "warnings": list(result.warnings),
        "plates": plates,
        "defects": [{"id": d.id, "plate": d.plate, "region": d.region, "kind": d.kind,
                     "area_mm2": d.area_mm2, "depth_pct": d.depth_pct,
                     "centroid_world": list(map(float, d.centroid_world))}
                    for d in result.defects],
        "lesions": [{"id": l.id, "bone": l.bone, "region": l.region,
                     "volume_mm3": l.volume_mm3, "max_slice_area_mm2": l.max_slice_area_mm2,
                     "max_diameter_mm": l.max_diameter_mm,
                     "centroid_world": list(map(float, l.centroid_world))}
                    for l in result.lesions],
        "rows": result.rows,
    }
    arrays["__doc__"] = np.array(json.dumps(_jsonable(doc), allow_nan=False))
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return path


def load_result(path: Path, geometry: Geometry) -> tuple[MeasureResult, str]:
    """Read a saved measurement of a label map on ``geometry`` (the folder's
    ``segmentation.nii.gz``); returns it and the hash of the config it was made with."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            doc = json.loads(str(z["__doc__"]))
            data = {k: z[k] for k in z.files if k != "__doc__"}
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"unreadable saved measurement ({exc})", path) from exc
    if doc.get("format") != _FORMAT:
        raise InputError(f"saved measurement has format {doc.get('format')}, not {_FORMAT}", path)
    if doc["geometry"]["shape"] != list(geometry.shape):
        raise InputError("saved measurement is of another grid than the segmentation", path)
    plates = {}
    for name, info in doc["plates"].items():
        kw = {key: data[f"{name}/{key}"] for key in _PLATE_ARRAYS}
        kw["region"] = kw["region"].astype(object)
        plates[name] = PlateResult(name=name, bone=info["bone"], present=info["present"],
                                   volume_mm3=_float(info["volume_mm3"]),
                                   region_volume_mm3={k: _float(v) for k, v in
                                                      info["region_volume_mm3"].items()},
                                   **kw)
    defects = [Defect(id=d["id"], plate=d["plate"], region=d["region"], kind=d["kind"],
                      area_mm2=_float(d["area_mm2"]), depth_pct=_float(d["depth_pct"]),
                      centroid_world=np.asarray(d["centroid_world"]))
               for d in doc["defects"]]
    lesions = [Lesion(id=l["id"], bone=l["bone"], region=l["region"],
                      volume_mm3=_float(l["volume_mm3"]),
                      max_slice_area_mm2=_float(l["max_slice_area_mm2"]),
                      max_diameter_mm=_float(l["max_diameter_mm"]),
                      centroid_world=np.asarray(l["centroid_world"]),
                      mask_index=data[f"lesion/{l['id']}"].astype(np.int64))
               for l in doc["lesions"]]
    rows = [{k: (_float(v) if k == "value" and (v is None or isinstance(v, str)) else v)
             for k, v in r.items()} for r in doc["rows"]]
    result = MeasureResult(side=doc["side"], geometry=geometry, plates=plates, defects=defects,
                           lesions=lesions, rows=rows,
                           thickness_map=np.zeros((0, 0, 0), np.float32),
                           warnings=list(doc["warnings"]))
    return result, doc["config_hash"]


def load_if_current(folder: Path, geometry: Geometry, *, side: str | None,
                    config_hash: str | None) -> MeasureResult | None:
    """The folder's saved measurement when it was made with this side and config, else None
    (and the log says why a stage measures again)."""
    path = Path(folder) / RESULT_FILE
    if not path.is_file():
        log.info("%s: no saved measurement; measuring again", folder)
        return None
    try:
        result, saved_hash = load_result(path, geometry)
    except InputError as exc:
        log.warning("%s; measuring again", exc)
        return None
    if config_hash is not None and saved_hash != config_hash:
        log.info("%s: saved measurement used another config; measuring again", folder)
        return None
    if result.side != side:
        log.info("%s: saved measurement is for side %s, not %s; measuring again", folder,
                 result.side, side)
        return None
    return result
