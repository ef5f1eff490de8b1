"""`cartiq measure` as a user runs it: outputs, and one clear line + exit 2 on bad input."""

import json

import numpy as np
import pytest
import yaml

from cartiq.io.volume import Geometry, write_volume
from cartiq.measurement.qc import load_qc_config

from _shapes import mini_knee
from _cli import run_cartiq as _cartiq, assert_one_line_error as _one_line_error


def _geometry(shape, spacing):
    return Geometry(tuple(shape), tuple(spacing), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    d = tmp_path_factory.mktemp("scan")
    lab, sp = mini_knee()
    g = _geometry(lab.shape, sp)
    rng = np.random.default_rng(0)
    write_volume(d / "image.nii.gz", (100 + 10 * rng.standard_normal(lab.shape)).astype(np.float32), g)
    write_volume(d / "seg.nii.gz", lab, g)
    return d


def test_measure_writes_the_contract_and_warns_about_missing_plate(scan, tmp_path):
    out = tmp_path / "out"
    res = _cartiq("measure", scan / "image.nii.gz", "--seg", scan / "seg.nii.gz", "-o", out)
    assert res.returncode == 0, res.stderr
    for name in ("measurements.csv", "defects.csv", "lesions.csv", "thickness.nii.gz",
                 "segmentation.nii.gz", "config.yaml", "qc_config.yaml", "manifest.json",
                 "meshes/femoral_cartilage.vtk"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    # the QC limits the status was decided by are in the folder, hashed like every output
    assert yaml.safe_load((out / "qc_config.yaml").read_text()) == \
        load_qc_config().model_dump(mode="json")
    assert {"config.yaml", "qc_config.yaml"} <= set(manifest["outputs"])
    assert manifest["side"] == "right" and manifest["side_source"] == "anatomy:plates"
    assert any("patellar_cartilage" in w for w in manifest["warnings"])
    assert "patellar_cartilage" in res.stderr  # the warning is logged too
    assert len(manifest["inputs"]["image"]["sha256"]) == 64
    header = (out / "measurements.csv").read_text().splitlines()[0]
    assert header == "structure,region,metric,value,unit,qc_status"
    rows = [l.split(",") for l in (out / "measurements.csv").read_text().splitlines()[1:]]
    # the patellar plate is missing: QC fails, and every row says so
    assert manifest["qc"]["status"] == "fail"
    assert {r[5] for r in rows} == {"fail"}
    fem = {r[2]: r[3] for r in rows if r[0] == "femoral_cartilage" and r[1] == "all"}
    assert abs(float(fem["thickness_median"]) - 1.6) < 0.08  # 2 voxels of 0.8 mm
    assert float(fem["thickness_mean"]) < float(fem["thickness_median"])  # thinner at the rim
    pat = {r[2]: r[3] for r in rows if r[0] == "patellar_cartilage" and r[1] == "all"}
    assert pat["volume"] == "0" and pat["thickness_mean"] == ""


def test_geometry_mismatch(scan, tmp_path):
    lab, sp = mini_knee()
    write_volume(tmp_path / "seg2.nii.gz", lab, _geometry(lab.shape, (0.8, 0.8, 0.9)))
    out = tmp_path / "out"
    res = _cartiq("measure", scan / "image.nii.gz", "--seg", tmp_path / "seg2.nii.gz", "-o", out)
    _one_line_error(res, "seg2.nii.gz", "spacing")
    assert not out.exists()


def test_unknown_labels(scan, tmp_path):
    lab, sp = mini_knee()
    lab[0, 0, 0] = 42
    write_volume(tmp_path / "seg3.nii.gz", lab, _geometry(lab.shape, sp))
    res = _cartiq("measure", scan / "image.nii.gz", "--seg", tmp_path / "seg3.nii.gz", "-o", tmp_path / "o")
    _one_line_error(res, "seg3.nii.gz", "unknown label values [42]")
    assert not (tmp_path / "o").exists()


def test_unwritable_output(scan, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    res = _cartiq("measure", scan / "image.nii.gz", "--seg", scan / "seg.nii.gz", "-o", blocker / "out")
    _one_line_error(res, "file.txt", "not a folder")


def test_missing_and_corrupt_inputs(scan, tmp_path):
    res = _cartiq("measure", tmp_path / "nope.nii.gz", "--seg", scan / "seg.nii.gz", "-o", tmp_path / "o")
    _one_line_error(res, "nope.nii.gz", "does not exist")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(np.random.default_rng(1).bytes(5000))
    res = _cartiq("measure", bad, "--seg", scan / "seg.nii.gz", "-o", tmp_path / "o")
    _one_line_error(res, "bad.nii.gz")
    assert not (tmp_path / "o").exists()


def test_bad_config_value(scan, tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("defects:\n  partial_fraction: 2.0\n")
    res = _cartiq("measure", scan / "image.nii.gz", "--seg", scan / "seg.nii.gz", "-o",
                  tmp_path / "o", "--config", cfg)
    _one_line_error(res, "m.yaml", "defects.partial_fraction")


def test_rerun_replaces_a_complete_folder(scan, tmp_path):
    out = tmp_path / "out"
    assert _cartiq("measure", scan / "image.nii.gz", "--seg", scan / "seg.nii.gz", "-o", out).returncode == 0
    # mark the first run's files: a stale mesh and an edited table must not survive
    (out / "meshes" / "old_plate.vtk").write_text("stale")
    (out / "measurements.csv").write_text("structure,region,metric,value,unit\nstale,all,x,1,mm\n")
    first = (out / "manifest.json").stat()
    assert _cartiq("measure", scan / "image.nii.gz", "--seg", scan / "seg.nii.gz", "-o", out).returncode == 0
    again = (out / "manifest.json").stat()
    assert (again.st_ino, again.st_mtime_ns) != (first.st_ino, first.st_mtime_ns)
    assert not (out / "meshes" / "old_plate.vtk").exists()
    table = (out / "measurements.csv").read_text()
    assert "stale" not in table and "femoral_cartilage" in table
    listed = json.loads((out / "manifest.json").read_text())["outputs"]
    assert not any("old_plate" in str(o) for o in listed)


def test_dicom_out_needs_dicom_input(scan, tmp_path):
    res = _cartiq("measure", scan / "image.nii.gz", "--seg", scan / "seg.nii.gz", "-o",
                  tmp_path / "o", "--dicom-out")
    _one_line_error(res, "image.nii.gz", "DICOM")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_dicom_out_on_real_dicom_series(data_mirror, tmp_path):
    import pydicom

    from cartiq.data.fetch import fetch_sample
    from cartiq.io.volume import read_volume

    folder = fetch_sample("pykneer_qdess", mirror=data_mirror, cache_dir=tmp_path / "cache")
    img = read_volume(folder)
    lab = np.zeros(img.array.shape, np.uint8)
    lab[200:300, 200:300, 30:50] = 1
    lab[200:300, 300:310, 30:50] = 4
    write_volume(tmp_path / "seg.nii.gz", lab, img.geometry)
    out = tmp_path / "out"
    res = _cartiq("measure", folder, "--seg", tmp_path / "seg.nii.gz", "-o", out, "--dicom-out",
                  "--side", "right")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dicom_out"]["status"] == "ok"
    seg = pydicom.dcmread(out / manifest["dicom_out"]["seg"])
    assert seg.Modality == "SEG"
    src_uid = manifest["inputs"]["image"]["series_instance_uid"]
    refs = [r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence]
    assert src_uid in refs
    sr = pydicom.dcmread(out / manifest["dicom_out"]["sr"])
    assert sr.Modality == "SR"


def test_lesion_connectivity_must_be_6_18_or_26(scan, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lesions:\n  connectivity: 7\n")
    res = _cartiq("measure", scan / "image.nii.gz", "--seg", scan / "seg.nii.gz", "-o",
                  tmp_path / "o", "--config", cfg)
    _one_line_error(res, "c.yaml", "lesions.connectivity")
    assert not (tmp_path / "o").exists()
