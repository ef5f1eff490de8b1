"""DICOM SEG + SR (TID 1500) of a scan folder on the real qDESS series, read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cartiq.errors import InputError
from cartiq.io.volume import read_volume, write_volume
from cartiq.io.labels import default_scheme

MEASUREMENTS = [("femoral_cartilage", "all", "volume", 1234.5, "mm3"),
                ("femoral_cartilage", "all", "thickness_mean", 2.25, "mm"),
                ("femoral_cartilage", "cMF", "thickness_mean", 2.5, "mm"),
                ("medial_tibial_cartilage", "all", "denuded_area", 12.0, "mm2"),
                ("bone_marrow_lesion", "all", "volume", 2144.6, "mm3")]


@pytest.fixture(scope="module")
def qdess_echo1(data_mirror, tmp_path_factory) -> Path:
    from cartiq.data.fetch import fetch_sample

    cache = tmp_path_factory.mktemp("cache")
    return fetch_sample("pykneer_qdess", mirror=data_mirror, cache_dir=cache) / "echo1"


def _scan_dir(dicom_dir: Path, out: Path) -> tuple[np.ndarray, object]:
    """A measure-style output folder on the real DICOM grid with a few labelled blobs."""
    s = default_scheme()
    img = read_volume(dicom_dir)
    g = img.geometry
    sp = g.spacing
    ii, jj, kk = np.ogrid[:g.shape[0], :g.shape[1], :g.shape[2]]

    def ball(c, r):
        return ((ii - c[0]) * sp[0]) ** 2 + ((jj - c[1]) * sp[1]) ** 2 + ((kk - c[2]) * sp[2]) ** 2 < r ** 2

    lab = np.zeros(g.shape, np.uint8)
    femur = ball((256, 200, 40), 20)
    lab[ball((256, 200, 40), 23) & ~femur] = s["femoral_cartilage"]
    lab[femur] = s["femur"]
    lab[ball((256, 200, 40), 6)] = s["bone_marrow_lesion"]
    lab[ball((256, 380, 30), 8)] = s["tibia"]
    lab[ball((256, 380, 30), 10) & (lab == 0)] = s["medial_tibial_cartilage"]
    out.mkdir(parents=True, exist_ok=True)
    write_volume(out / "segmentation.nii.gz", lab, g)
    (out / "measurements.csv").write_text("structure,region,metric,value,unit\n" + "".join(
        f"{a},{b},{c},{d},{e}\n" for a, b, c, d, e in MEASUREMENTS))
    (out / "defects.csv").write_text(
        "defect_id,plate,region,kind,area_mm2,depth_pct,centroid_x_mm,centroid_y_mm,centroid_z_mm\n"
        "1,femoral_cartilage,cMF,full,33.5,100,0,0,0\n")
    (out / "lesions.csv").write_text(
        "lesion_id,bone,region,volume_mm3,max_slice_area_mm2,max_diameter_mm,centroid_x_mm,"
        "centroid_y_mm,centroid_z_mm\n1,femur,cMF,2144.6,190.2,16.1,0,0,0\n")
    manifest = {"stage": "measure", "side": "right", "inputs": {"image": {
        "path": str(dicom_dir.resolve()), "format": "dicom",
        "series_instance_uid": img.meta["series_instance_uid"], "echo": 1}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return lab, g


@pytest.fixture(scope="module")
def written(qdess_echo1, tmp_path_factory):
    from cartiq.measurement.dicom_out import write_dicom_outputs

    scan = tmp_path_factory.mktemp("scan")
    lab, geometry = _scan_dir(qdess_echo1, scan)
    return write_dicom_outputs(scan), lab, geometry, qdess_echo1


@pytest.mark.slow
def test_seg_reads_back_voxel_exact(written):
    import highdicom as hd
    import pydicom

    result, lab, g, src = written
    seg = hd.seg.segread(result.seg)
    s = default_scheme()
    names = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
    assert names == ["femur", "tibia", "femoral_cartilage", "medial_tibial_cartilage",
                     "bone_marrow_lesion"]
    # references the source series and study
    source = pydicom.dcmread(next(p for p in sorted(src.iterdir()) if p.is_file()))
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    ref_series = {u[1] for u in seg.get_source_image_uids()}
    assert ref_series == {source.SeriesInstanceUID}
    vol = seg.get_volume(combine_segments=True)
    arr = vol.array
    idx = np.argwhere(arr > 0)
    world = idx @ vol.affine[:3, :3].T + vol.affine[:3, 3]
    ours = np.round(g.world_to_index(world)).astype(int)
    got = arr[tuple(idx.T)]
    expect_names = [names[v - 1] for v in got]
    assert [s.name_of(int(v)) for v in lab[tuple(ours.T)]] == expect_names
    assert len(idx) == int((lab > 0).sum())


@pytest.mark.slow
def test_sr_tid1500_values(written):
    import highdicom as hd

    result, *_ = written
    sr = hd.sr.srread(result.sr)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = {str(g.tracking_identifier): g for g in sr.content.get_volumetric_roi_measurement_groups()}
    fem = groups["femoral_cartilage"]
    values = {(m.name.meaning, getattr(m.derivation, "meaning", None)): m.value
              for m in fem.get_measurements()}
    assert values[("Volume", None)] == pytest.approx(1234.5)
    assert values[("Cartilage thickness", "Mean")] == pytest.approx(2.25)
    assert groups["femoral_cartilage cMF"].get_measurements()[0].value == pytest.approx(2.5)
    assert fem.referenced_segment.referenced_segment_numbers == [3]
    bml = groups["BML 1 femur cMF"]
    assert bml.referenced_segment.referenced_segment_numbers == [5]
    assert {m.name.meaning: m.value for m in bml.get_measurements()}["Diameter"] == pytest.approx(16.1)
    evid = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert sum(len(s.ReferencedSOPSequence) for s in evid) == 80 + 1  # source slices + SEG


def test_non_dicom_input_is_refused(tmp_path):
    from cartiq.measurement.dicom_out import write_dicom_outputs

    (tmp_path / "manifest.json").write_text(json.dumps(
        {"inputs": {"image": {"path": str(tmp_path / "img.nii.gz"), "format": "nifti"}}}))
    with pytest.raises(InputError, match="not a DICOM series"):
        write_dicom_outputs(tmp_path)


def test_model_provenance_sets_algorithm():
    from cartiq.measurement.dicom_out import model_of

    m = {"name": "cartiq-knee", "version": "1.0"}
    assert model_of({"segmentation": {"model": m}}) == m
    assert model_of({"batch": {"segmentation": "model", "model": m}}) == m
    assert model_of({"batch": {"segmentation": "given", "model": m}}) == {}
    assert model_of({"inputs": {}}) == {}


@pytest.mark.slow
def test_segmentation_on_another_grid_is_refused(qdess_echo1, tmp_path):
    from cartiq.measurement.dicom_out import write_dicom_outputs
    from cartiq.io.volume import Geometry

    lab, g = _scan_dir(qdess_echo1, tmp_path)
    shifted = Geometry(g.shape, g.spacing, tuple(np.add(g.origin, (0.0, 0.0, 5.0))), g.direction)
    write_volume(tmp_path / "segmentation.nii.gz", lab, shifted)
    with pytest.raises(InputError, match="slice positions do not match"):
        write_dicom_outputs(tmp_path)
    assert not (tmp_path / "dicom" / "segmentation.seg.dcm").exists()
