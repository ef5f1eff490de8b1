"""File side of the measurement stage: reading and checking inputs, writing the contract.

Output folder of ``cartiq measure`` (and ``cartiq run``):

``measurements.csv``  structure,region,metric,value,unit,qc_status (the scan's QC status,
                      pass|warn|fail, on every row: a ``fail`` scan's numbers are marked)
``defects.csv``       defect_id,plate,region,kind,area_mm2,depth_pct,centroid_{x,y,z}_mm
``lesions.csv``       lesion_id,bone,region,volume_mm3,max_slice_area_mm2,max_diameter_mm,centroid_{x,y,z}_mm
``thickness.nii.gz``  per cartilage voxel: thickness (mm) of its nearest interface point
``segmentation.nii.gz`` the label map in the cartiq scheme, input geometry
``meshes/<plate>.vtk`` subchondral surface patch with point data thickness_mm, region_id, defect_id
``config.yaml``       the resolved measurement config
``qc_config.yaml``    the resolved QC limits the status was decided by (``cartiq qc``
                      rewrites it when it rechecks with other limits)
``manifest.json``     provenance; written last - the folder is complete when it exists
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from cartiq.config import MeasureConfig, resolved
from cartiq.errors import InputError, OutputError
from cartiq.io.volume import (Geometry, Volume, atomic_write_bytes, atomic_write_text,
                              check_same_geometry, is_dicom_path, read_volume, sha256_file,
                              write_volume)
from cartiq.io.labels import (PLATES, default_scheme, label_counts, load_mapping,
                               to_default_scheme)
from cartiq.io.outputs import (BackgroundWrites, begin_folder, check_writable, write_csv,
                               write_manifest, write_vtk_polydata)
from cartiq.measurement.qc import QCConfig, QCFlag, QCResult, load_qc_config, write_qc
from cartiq.measurement.regions import REGION_CODES

__all__ = ["MeasureInputs", "load_inputs", "write_results", "defect_rows", "lesion_rows",
           "MEASUREMENT_COLUMNS", "DEFECT_COLUMNS", "LESION_COLUMNS"]

log = logging.getLogger(__name__)

MEASUREMENT_COLUMNS = ["structure", "region", "metric", "value", "unit", "qc_status"]
DEFECT_COLUMNS = ["defect_id", "plate", "region", "kind", "area_mm2", "depth_pct",
                  "centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]
LESION_COLUMNS = ["lesion_id", "bone", "region", "volume_mm3", "max_slice_area_mm2",
                  "max_diameter_mm", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]


@dataclass
class MeasureInputs:
    image: Volume
    seg: Volume
    labels: np.ndarray  # cartiq scheme
    side: str | None
    side_source: str
    mapping_name: str
    side_check: dict[str, Any] = field(default_factory=dict)  # given side vs anatomy
    meanwhile: Any = None  # what load_inputs(meanwhile=...) computed while the image was read

    @property
    def geometry(self) -> Geometry:
        return self.seg.geometry

    def describe(self) -> dict[str, Any]:
        def one(vol: Volume) -> dict[str, Any]:
            meta = {k: v for k, v in vol.meta.items() if k != "files"}
            if vol.path is None:  # an in-memory volume (Python API)
                return {"path": None, "sha256": None, "geometry": vol.geometry.to_json(), **meta}
            # the sha256 taken while the file was checked and read (cartiq.io.integrity)
            sha = meta.pop("sha256", None) or sha256_file(vol.path)
            return {"path": str(Path(vol.path).resolve()), "sha256": sha,
                    "geometry": vol.geometry.to_json(), **meta}

        return {"image": one(self.image), "seg": one(self.seg)}


def load_inputs(image: Path, seg: Path, out_dir: Path, *, labels: str | None = None,
                side: str | None = None, series: str | None = None,
                echo: int | None = None, fresh: bool = True, side_source: str = "flag",
                side_override: bool = False,
                meanwhile: Callable[[MeasureInputs], Any] | None = None) -> MeasureInputs:
    """Read image and label map and check everything before any output is written
    (``fresh``: the output folder will be emptied, so it must not hold an input).

    An empty label map, or one with nothing of the cartiq scheme after mapping, is an
    :class:`InputError`; so is a given side (``side`` from ``side_source``, or the DICOM
    header) that the anatomy contradicts, unless ``side_override``.

    The image is read in a thread (decompressing and checking it runs mostly outside the
    GIL) while the label map is read and converted, and ``meanwhile(inputs)`` - given the
    inputs but their ``image`` - runs; its result is ``inputs.meanwhile``.  Errors come in
    the order of reading one thing after the other: the image's, the label map's, the grids
    that differ, the label map's content, then ``meanwhile``'s.  (A DICOM image is awaited
    before the labels are converted: its header may give the side.)"""
    from concurrent.futures import ThreadPoolExecutor

    check_writable(out_dir, inputs=(image, seg) if fresh else ())
    mapping = load_mapping(labels)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cartiq-read") as pool:
        pending = pool.submit(read_volume, image, series=series, echo=echo, kind="image")

        def image_volume(lab: Volume) -> Volume:
            img = pending.result()
            check_same_geometry(img.geometry, lab.geometry, img.path, lab.path)
            return img

        try:
            lab = read_volume(seg, kind="labels")
        except Exception:
            pending.result()
            raise
        img = image_volume(lab) if is_dicom_path(image) else None
        try:
            inputs = _convert(lab, mapping, img, side=side, side_source=side_source,
                              side_override=side_override)
            if meanwhile is not None:
                inputs.meanwhile = meanwhile(inputs)
        except Exception:
            if img is None:
                image_volume(lab)
            raise
        inputs.image = img if img is not None else image_volume(lab)
    return inputs


def _convert(lab: Volume, mapping, img: Volume | None, *, side: str | None,
             side_source: str, side_override: bool) -> MeasureInputs:
    """The label map in the cartiq scheme, checked (``img``: the DICOM image, whose header
    may give the side; None for other formats)."""
    if not lab.array.any():
        raise InputError("label map is empty (every voxel is 0): nothing to measure", lab.path)
    converted, info = to_default_scheme(lab.array, mapping, lab.geometry.affine, side=side,
                                        header_side=img.meta.get("side") if img else None,
                                        path=lab.path, side_source=side_source,
                                        side_override=side_override)
    counts = label_counts(converted, minlength=256)
    if not counts[1:].any():
        raise InputError(f"label map holds no structure of the cartiq scheme under label "
                         f"mapping '{mapping.name}' (wrong --labels?): nothing to measure",
                         lab.path)
    if not any(counts[default_scheme()[p]] for p in PLATES):
        raise InputError("label map has no cartilage plate (femoral, tibial or patellar "
                         "cartilage label): nothing to measure", lab.path)
    return MeasureInputs(image=img, seg=lab, labels=converted, side=info["side"],
                         side_source=info["side_source"], mapping_name=mapping.name,
                         side_check=info.get("side_check", {}))


def defect_rows(result) -> list[dict[str, Any]]:
    return [{"defect_id": d.id, "plate": d.plate, "region": d.region, "kind": d.kind,
             "area_mm2": d.area_mm2, "depth_pct": d.depth_pct,
             "centroid_x_mm": d.centroid_world[0], "centroid_y_mm": d.centroid_world[1],
             "centroid_z_mm": d.centroid_world[2]} for d in result.defects]


def lesion_rows(result) -> list[dict[str, Any]]:
    return [{"lesion_id": l.id, "bone": l.bone, "region": l.region, "volume_mm3": l.volume_mm3,
             "max_slice_area_mm2": l.max_slice_area_mm2, "max_diameter_mm": l.max_diameter_mm,
             "centroid_x_mm": l.centroid_world[0], "centroid_y_mm": l.centroid_world[1],
             "centroid_z_mm": l.centroid_world[2]} for l in result.lesions]


def _region_ids(plate: str, codes: np.ndarray) -> np.ndarray:
    table = {c: i + 1 for i, c in enumerate(REGION_CODES.get(plate, []))}
    return np.array([table.get(c, 0) for c in codes], dtype=float)


def write_results(out_dir: Path, result, inputs: MeasureInputs, config: MeasureConfig,
                  manifest: dict[str, Any], *, t_start: float,
                  dicom_out: bool = False, fresh: bool = True,
                  qc_flags: list[QCFlag] | None = None) -> dict[str, Any]:
    """Write the output contract into an emptied folder (``fresh=False``: keep what an
    earlier step of the same run wrote there); the manifest goes last.  ``qc_flags``:
    flags computed already (the Python API's), else computed here."""
    begin_folder(out_dir, fresh=fresh, inputs=(inputs.image.path, inputs.seg.path)
                 if fresh else ())
    geometry = inputs.geometry
    from cartiq.config import config_hash
    from cartiq.measurement.store import RESULT_FILE, save_result

    qc_config = load_qc_config()
    if qc_flags is None:
        qc_flags = _qc_flags(out_dir, result, inputs, qc_config)
    status = "not run" if qc_flags is None else QCResult(flags=qc_flags).status
    # one thread writes the files in this order (compressing and reading back the volumes
    # outside the GIL) while this one draws qc.png, which goes last
    with BackgroundWrites() as bg:
        written = [
            bg.submit(write_csv, out_dir / "measurements.csv", MEASUREMENT_COLUMNS,
                      [{**r, "qc_status": status} for r in result.rows]),
            bg.submit(write_csv, out_dir / "defects.csv", DEFECT_COLUMNS, defect_rows(result)),
            bg.submit(write_csv, out_dir / "lesions.csv", LESION_COLUMNS, lesion_rows(result)),
            bg.submit(write_volume, out_dir / "thickness.nii.gz", result.thickness_map, geometry),
            bg.submit(write_volume, out_dir / "segmentation.nii.gz",
                      inputs.labels.astype(np.uint8), geometry),
        ]
        for name, p in result.plates.items():
            if not p.present:
                continue
            written.append(bg.submit(
                write_vtk_polydata, out_dir / "meshes" / f"{name}.vtk", p.points_world, p.faces,
                {"thickness_mm": p.thickness_mm, "region_id": _region_ids(name, p.region),
                 "defect_id": p.defect_id.astype(float)}, title=f"cartiq {name}"))
        written.append(bg.submit(save_result, result, out_dir / RESULT_FILE,
                                 config_hash=config_hash(config)))
        config_path, qc_config_path = out_dir / "config.yaml", out_dir / "qc_config.yaml"
        bg.submit(atomic_write_text, config_path, yaml.safe_dump(resolved(config), sort_keys=False))
        bg.submit(atomic_write_text, qc_config_path,
                  yaml.safe_dump(resolved(qc_config), sort_keys=False))
        qc = _run_qc(out_dir, result, inputs, qc_flags, qc_config,
                     save_figure=lambda path, png: bg.submit(atomic_write_bytes, path, png))
    outputs = [f.result() for f in written] + [config_path, qc_config_path]
    manifest = dict(manifest)
    manifest["warnings"] = list(result.warnings) + list(manifest.get("warnings", []))
    manifest["qc"] = qc
    manifest["timings_s"] = {**manifest.get("timings_s", {}),
                             "write": round(time.perf_counter() - t_start, 3)}
    manifest["outputs"] = sorted(str(Path(p).relative_to(out_dir)) for p in outputs)
    manifest["geometry"] = geometry.to_json()
    if dicom_out:
        manifest["dicom_out"] = _run_dicom_out(out_dir, manifest)
    write_manifest(out_dir, manifest)
    log.info("wrote %d files to %s", len(outputs) + 1, out_dir)
    return manifest


def _qc_flags(out_dir: Path, result, inputs: MeasureInputs,
              config: QCConfig | None = None) -> list[QCFlag] | None:
    """QC flags (cartiq.measurement.qc) before anything is written: the CSV carries the
    status.  None when they cannot be computed (status ``not run``, logged)."""
    try:
        return write_qc(out_dir, result=result, image=inputs.image, labels=inputs.labels,
                        config=config, figure=False).flags
    except Exception as exc:  # QC never costs the numbers; "not run" is never "pass"
        log.warning("QC flags failed: %s", exc)
        return None


def _run_qc(out_dir: Path, result, inputs: MeasureInputs, flags: list[QCFlag] | None = None,
            config: QCConfig | None = None, save_figure=None) -> dict[str, Any]:
    """QC picture and flags (cartiq.measurement.qc); a plotting failure never fails the
    measurement.  ``save_figure(path, png)`` stores the picture (default: written now)."""
    if flags is None:
        return {"status": "not run"}
    try:
        qc = write_qc(out_dir, result=result, image=inputs.image, labels=inputs.labels,
                      flags=flags, config=config, save_figure=save_figure)
        return qc if isinstance(qc, dict) else getattr(qc, "to_json", lambda: {"status": "ok"})()
    except OutputError:  # a full disk is not a plotting failure: the folder is not complete
        raise
    except Exception as exc:  # reports never fail the analysis; the flags stand
        log.warning("QC figure failed: %s", exc)
        return QCResult(flags=flags, errors=[str(exc)[:300]]).to_json()


def _run_dicom_out(out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """DICOM SEG + SR (cartiq.measurement.dicom_out); a failure is recorded, never fatal."""
    try:
        from cartiq.measurement.dicom_out import write_dicom_outputs

        res = write_dicom_outputs(out_dir, manifest=manifest)
        return {"status": "ok", "seg": str(Path(res.seg).relative_to(out_dir)),
                "sr": str(Path(res.sr).relative_to(out_dir)), "n_segments": res.n_segments}
    except OutputError:  # a full disk: the folder must not be marked complete
        raise
    except Exception as exc:  # the numbers are written already; DICOM export is extra
        log.warning("DICOM SEG/SR export failed: %s", exc)
        return {"status": "failed", "error": str(exc)[:300]}
