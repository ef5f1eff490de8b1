"""DICOM outputs for PACS and viewers: the segmentation as DICOM SEG and the measurements
as a DICOM SR measurement report (TID 1500), both referencing the source series.

Only possible when the input image was a DICOM series: the SEG frames are the source
slices (same order, position and orientation, checked against the label map's geometry).

SEG (``segmentation.seg.dcm``): one segment per cartiq label present, numbered 1..n in
label order; ``SegmentLabel`` is the cartiq structure name.  Category/type codes are
SNOMED CT (bones, cartilage tissue, meniscus, bone-marrow edema-like lesion) with the knee
joint as anatomic region.

SR (``measurements.sr.dcm``, Comprehensive 3D SR, TID 1500 "Imaging Measurement Report"):
one volumetric ROI group (TID 1411) per plate and subregion, referencing the plate's SEG
segment, with volume, mean/max thickness, total/covered/denuded subchondral bone area and
denuded percentage; one group per bone-marrow lesion (volume, largest diameter, largest
slice area) referencing the lesion segment; one measurement group (TID 1501) per cartilage
defect (area, depth).  Measurements without a standard concept use the private coding
scheme ``99CARTIQ``; values are the numbers in ``measurements.csv``/``defects.csv``/
``lesions.csv``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cartiq.errors import InputError
from cartiq.io.volume import Geometry, atomic_path, read_volume
from cartiq.io.labels import default_scheme

__all__ = ["DicomOutResult", "write_dicom_outputs", "source_datasets", "SEG_NAME", "SR_NAME"]

log = logging.getLogger(__name__)

SEG_NAME = "segmentation.seg.dcm"
SR_NAME = "measurements.sr.dcm"
PRIVATE_SCHEME = "99CARTIQ"


@dataclass
class DicomOutResult:
    seg: Path
    sr: Path
    n_segments: int
    n_groups: int


# ------------------------------------------------------------------------- source


def source_datasets(folder: Path, geometry: Geometry, *, series_uid: str | None = None,
                    echo: int | None = None) -> list[Any]:
    """The source series' slices (with pixels) in the order of the volume's k axis.

    Raises :class:`InputError` if no series matches or the slices do not match ``geometry``.
    """
    import pydicom

    from cartiq.io.dicom import list_series

    series = list_series(Path(folder))
    if series_uid:
        series = [s for s in series if series_uid in s.uids] or series
    if len(series) != 1:
        raise InputError(f"cannot tell the source series ({len(series)} series found)", folder)
    info = series[0]
    chosen = int(echo) if echo else min(info.echoes)
    items = info.echoes.get(chosen)
    if not items:
        raise InputError(f"source series has no echo {chosen}", folder)
    iop = np.asarray(items[0][1].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    items = sorted(items, key=lambda it: float(
        np.dot(normal, np.asarray(it[1].ImagePositionPatient, float))))
    if len(items) != geometry.shape[2]:
        raise InputError(f"source series has {len(items)} slices, the segmentation "
                         f"{geometry.shape[2]}", folder)
    first, last = (np.asarray(items[i][1].ImagePositionPatient, float) for i in (0, -1))
    expect = geometry.index_to_world(np.array([[0, 0, 0], [0, 0, geometry.shape[2] - 1]]))
    tol = 0.05 * max(geometry.spacing)
    if not (np.allclose(first, expect[0], atol=tol) and np.allclose(last, expect[1], atol=tol)):
        raise InputError("source slice positions do not match the segmentation's geometry", folder)
    if (int(items[0][1].Columns), int(items[0][1].Rows)) != tuple(geometry.shape[:2]):
        raise InputError("source slice size does not match the segmentation", folder)
    datasets = [pydicom.dcmread(str(p)) for p, _ in items]
    for ds in datasets:  # anonymised files may lack type-2 patient/study attributes
        for keyword in _TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return datasets


_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID",
          "AccessionNumber", "StudyDate", "StudyTime", "ReferringPhysicianName")


# ------------------------------------------------------------------------- codes


def _codes() -> dict[str, tuple[Any, Any]]:
    from pydicom.sr.codedict import codes

    anat, abn = codes.SCT.AnatomicalStructure, codes.SCT.MorphologicallyAbnormalStructure
    return {
        "femur": (anat, codes.SCT.Femur), "tibia": (anat, codes.SCT.Tibia),
        "patella": (anat, codes.SCT.Patella),
        "femoral_cartilage": (anat, codes.SCT.CartilageTissue),
        "medial_tibial_cartilage": (anat, codes.SCT.CartilageTissue),
        "lateral_tibial_cartilage": (anat, codes.SCT.CartilageTissue),
        "patellar_cartilage": (anat, codes.SCT.CartilageTissue),
        "medial_meniscus": (anat, codes.SCT.Meniscus), "lateral_meniscus": (anat, codes.SCT.Meniscus),
        "bone_marrow_lesion": (abn, codes.SCT.Edema),
    }


def _private(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


def _metric_concepts() -> dict[str, tuple[Any, Any, Any]]:
    """measurements.csv metric -> (concept name, UCUM unit, derivation or None)."""
    from pydicom.sr.codedict import codes

    u = codes.UCUM
    return {
        "volume": (codes.SCT.Volume, u.CubicMillimeter, None),
        "thickness_mean": (_private("CTH", "Cartilage thickness"), u.Millimeter, codes.SCT.Mean),
        "thickness_max": (_private("CTH", "Cartilage thickness"), u.Millimeter, codes.SCT.Maximum),
        "interface_area": (_private("tAB", "Total subchondral bone area"), u.SquareMillimeter, None),
        "covered_area": (_private("cAB", "Cartilage-covered subchondral bone area"),
                         u.SquareMillimeter, None),
        "denuded_area": (_private("dAB", "Denuded subchondral bone area"), u.SquareMillimeter, None),
        "denuded_area_pct": (_private("dABp", "Denuded area percentage of tAB"), u.Percent, None),
    }


# ------------------------------------------------------------------------- writing


def model_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The segmentation model's provenance (``cartiq run``/``segment``/``batch``), or {}."""
    batch = manifest.get("batch") or {}
    if batch.get("segmentation") == "given":
        return {}
    for m in (manifest.get("model"), (manifest.get("segmentation") or {}).get("model"),
              batch.get("model")):
        if isinstance(m, dict) and m:
            return m
    return {}


def _segmentation(sources: list[Any], labels: np.ndarray, manifest: dict[str, Any]):
    import highdicom as hd

    from cartiq._version import __version__

    scheme = default_scheme()
    codes_of = _codes()
    present = [v for v in sorted(scheme.values) if v != 0 and (labels == v).any()]
    if not present:
        raise InputError("segmentation is empty: nothing to write as DICOM SEG")
    lut = np.zeros(int(labels.max()) + 1, np.uint8)
    model = model_of(manifest)
    algo = None
    if model:
        from pydicom.sr.codedict import codes

        algo = hd.AlgorithmIdentificationSequence(
            name=str(model.get("name", "cartiq model"))[:64], family=codes.cid7162.ArtificialIntelligence,
            version=str(model.get("version", __version__))[:64])
    descriptions, numbers = [], {}
    from pydicom.sr.codedict import codes

    for n, value in enumerate(present, start=1):
        name = scheme.name_of(value)
        lut[value] = n
        numbers[name] = n
        category, kind = codes_of[name]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=n, segment_label=name, segmented_property_category=category,
            segmented_property_type=kind, algorithm_type="AUTOMATIC" if algo else "MANUAL",
            algorithm_identification=algo, anatomic_regions=[codes.SCT.KneeJoint],
            tracking_uid=hd.UID(), tracking_id=name))
    pixels = lut[labels].transpose(2, 1, 0)  # (frames=k, rows=j, cols=i)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.ascontiguousarray(pixels),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=901,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="cartiq",
        manufacturer_model_name="cartiq", software_versions=__version__,
        device_serial_number="0", series_description="cartiq segmentation"[:64],
        content_label="CARTIQ", content_description="cartiq knee labels")
    return seg, numbers


def _tracking(identifier: str):
    import highdicom as hd
    from highdicom.sr import TrackingIdentifier

    return TrackingIdentifier(uid=hd.UID(), identifier=identifier[:64])


def _measurement_groups(seg, numbers: dict[str, int], rows: list[dict[str, str]],
                        defects: list[dict[str, str]], lesions: list[dict[str, str]],
                        source_series_uid: str) -> list[Any]:
    import highdicom.sr as sr
    from pydicom.sr.codedict import codes

    concepts = _metric_concepts()
    by_structure: dict[tuple[str, str], list[dict[str, str]]] = {}
    for r in rows:
        by_structure.setdefault((r["structure"], r["region"]), []).append(r)
    groups = []

    def ref(name: str):
        return sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                    segment_number=numbers[name],
                                    source_series=sr.SourceSeriesForSegmentation(source_series_uid))

    def value(r: dict[str, str]) -> float | None:
        try:
            v = float(r["value"])
        except (TypeError, ValueError, KeyError):
            return None
        return v if np.isfinite(v) else None

    for (structure, region), items in by_structure.items():
        if structure not in numbers or structure == "bone_marrow_lesion":
            continue
        meas = []
        for r in items:
            v = value(r)
            if r["metric"] in concepts and v is not None:
                name, unit, derivation = concepts[r["metric"]]
                meas.append(sr.Measurement(name=name, value=v, unit=unit, derivation=derivation))
        if meas:
            label = structure if region == "all" else f"{structure} {region}"
            groups.append(sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(label), referenced_segment=ref(structure),
                finding_type=codes.SCT.CartilageTissue,
                finding_sites=[sr.FindingSite(codes.SCT.KneeJoint)], measurements=meas))
    u = codes.UCUM
    for les in lesions:
        if "bone_marrow_lesion" not in numbers:
            break
        meas = []
        for key, name, unit in (("volume_mm3", codes.SCT.Volume, u.CubicMillimeter),
                                ("max_diameter_mm", codes.SCT.Diameter, u.Millimeter),
                                ("max_slice_area_mm2", codes.SCT.Area, u.SquareMillimeter)):
            v = value({"value": les.get(key)})
            if v is not None:
                meas.append(sr.Measurement(name=name, value=v, unit=unit))
        groups.append(sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(
                f"BML {les.get('lesion_id')} {les.get('bone')} {les.get('region')}"),
            referenced_segment=ref("bone_marrow_lesion"), finding_type=codes.SCT.Edema,
            finding_sites=[sr.FindingSite(codes.SCT.BoneMarrow)], measurements=meas))
    for d in defects:
        meas = []
        for key, name, unit in (("area_mm2", codes.SCT.Area, u.SquareMillimeter),
                                ("depth_pct", codes.SCT.Depth, u.Percent)):
            v = value({"value": d.get(key)})
            if v is not None:
                meas.append(sr.Measurement(name=name, value=v, unit=unit))
        groups.append(sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(f"defect {d.get('defect_id')} {d.get('plate')} "
                                          f"{d.get('region')} {d.get('kind')}"),
            finding_type=codes.SCT.Lesion, finding_sites=[sr.FindingSite(codes.SCT.CartilageTissue)],
            measurements=meas))
    return groups


def write_dicom_outputs(scan_dir: Path, *, source: Path | None = None,
                        out_dir: Path | None = None,
                        manifest: dict[str, Any] | None = None) -> DicomOutResult:
    """Write ``segmentation.seg.dcm`` and ``measurements.sr.dcm`` for a finished scan folder.

    Parameters
    ----------
    scan_dir : a ``cartiq measure``/``run`` output folder (manifest.json, segmentation.nii.gz,
        measurements.csv, defects.csv, lesions.csv).
    source : the source DICOM folder (default: the manifest's ``inputs.image.path``).
    out_dir : where to write (default: ``scan_dir/dicom``).
    manifest : the scan's manifest when it is not written yet (``cartiq measure
        --dicom-out`` calls this before writing ``manifest.json``).

    Raises :class:`InputError` when the input was not DICOM or does not match.
    """
    import highdicom as hd
    import highdicom.sr as sr

    from cartiq._version import __version__
    from cartiq.measurement.qc import read_manifest, read_table

    scan_dir = Path(scan_dir)
    manifest = manifest if manifest is not None else read_manifest(scan_dir)
    info = (manifest.get("inputs") or {}).get("image") or {}
    src = Path(source) if source is not None else Path(info.get("path") or "")
    if source is None and info.get("format") != "dicom" or not src.is_dir():
        raise InputError("the input image was not a DICOM series; DICOM SEG/SR need the "
                         "source DICOM series (give it with --source DICOM_FOLDER)",
                         src if str(src) != "." else scan_dir)
    seg_vol = read_volume(scan_dir / "segmentation.nii.gz", kind="labels")
    sources = source_datasets(src, seg_vol.geometry, series_uid=info.get("series_instance_uid"),
                              echo=info.get("echo"))
    seg, numbers = _segmentation(sources, seg_vol.array, manifest)
    out_dir = Path(out_dir) if out_dir is not None else scan_dir / "dicom"
    with atomic_path(out_dir / SEG_NAME) as tmp:
        seg.save_as(tmp)
    groups = _measurement_groups(seg, numbers, read_table(scan_dir / "measurements.csv"),
                                 read_table(scan_dir / "defects.csv"),
                                 read_table(scan_dir / "lesions.csv"),
                                 str(sources[0].SeriesInstanceUID))
    from pydicom.sr.codedict import codes

    observer = sr.ObserverContext(observer_type=codes.DCM.Device,
                                  observer_identifying_attributes=sr.DeviceObserverIdentifyingAttributes(
                                      uid=hd.UID(), name="cartiq", model_name=f"cartiq {__version__}"))
    mri = sr.CodedConcept(value="113091000", scheme_designator="SCT",
                          meaning="Magnetic resonance imaging")
    report = sr.MeasurementReport(
        observation_context=sr.ObservationContext(observer_device_context=observer),
        procedure_reported=mri, imaging_measurements=groups)
    doc = sr.Comprehensive3DSR(evidence=[*sources, seg], content=report, series_instance_uid=hd.UID(),
                               series_number=902, sop_instance_uid=hd.UID(), instance_number=1,
                               manufacturer="cartiq", is_complete=True,
                               series_description="cartiq measurements")
    with atomic_path(out_dir / SR_NAME) as tmp:
        doc.save_as(tmp)
    log.info("DICOM SEG (%d segments) and SR (%d groups) in %s", len(numbers), len(groups), out_dir)
    return DicomOutResult(seg=out_dir / SEG_NAME, sr=out_dir / SR_NAME, n_segments=len(numbers),
                          n_groups=len(groups))
