"""QC that refuses broken segmentations: plausible adult ranges make a broken scan `fail`.

The phantom passes, the phantom with its femoral cartilage dilated to about twice its volume
fails, a huge bone-marrow lesion fails, a plate mostly on the image border fails, and the
four real manual label maps never fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from scipy import ndimage

from cartiq.io.labels import CONFIG_DIR
from cartiq.errors import ConfigError
from cartiq.io.labels import default_scheme
from cartiq.measurement.measure import measure_labels
from cartiq.measurement.qc import QCConfig, QCResult, load_qc_config, qc_checks

S = default_scheme()


@pytest.fixture(scope="module")
def phantom():
    from cartiq.data.phantom import PhantomSpec, make_phantom

    return make_phantom(PhantomSpec(seed=5, spacing_mm=(0.8, 0.8, 1.2)))


def status(labels, geometry, side, *, measure=True):
    result = measure_labels(labels, geometry, side=side) if measure else None
    flags = qc_checks(labels, geometry, side=side, result=result)
    return QCResult(flags=flags).status, flags


def errors(flags):
    return sorted((f.code, f.structure) for f in flags if f.severity == "error")


def test_shipped_qc_yaml_is_the_code_default_and_cites_sources():
    text = (CONFIG_DIR / "qc.yaml").read_text()
    assert load_qc_config() == QCConfig()
    assert "Eckstein" in text and "Osteoarthritis Cartilage" in text and "UNCERTAIN" in text


def test_bad_qc_yaml_is_one_clear_error(tmp_path):
    bad = tmp_path / "qc.yaml"
    bad.write_text(yaml.safe_dump({"plausible": {"max_bml_volume_mm3": -1}}))
    with pytest.raises(ConfigError, match=r"qc.yaml: plausible.max_bml_volume_mm3"):
        load_qc_config(bad)


def test_measured_phantom_passes(phantom):
    st, flags = status(phantom.labels.array, phantom.labels.geometry, "right")
    assert st == "pass", [f.message for f in flags]


def test_femoral_cartilage_dilated_to_twice_its_volume_fails(phantom):
    lab = phantom.labels.array.copy()
    fc = lab == S["femoral_cartilage"]
    target = 2 * fc.sum()
    while (lab == S["femoral_cartilage"]).sum() < target:  # grow into soft tissue only
        grown = ndimage.binary_dilation(lab == S["femoral_cartilage"]) & (lab == 0)
        lab[grown] = S["femoral_cartilage"]
    ratio = (lab == S["femoral_cartilage"]).sum() / fc.sum()
    assert 2.0 <= ratio < 2.6
    st, flags = status(lab, phantom.labels.geometry, "right")
    assert st == "fail"
    assert ("thickness_range", "femoral_cartilage") in errors(flags), [f.message for f in flags]


def _with_femoral_volume(phantom, target_mm3):
    """The phantom with its femoral cartilage grown into soft tissue, one voxel layer at a
    time, until it holds at least ``target_mm3``."""
    lab = phantom.labels.array.copy()
    vox = phantom.labels.geometry.voxel_volume_mm3
    while (lab == S["femoral_cartilage"]).sum() * vox < target_mm3:
        grown = ndimage.binary_dilation(lab == S["femoral_cartilage"]) & (lab == 0)
        lab[grown] = S["femoral_cartilage"]
    return lab


def test_femoral_volume_above_the_typical_range_warns(phantom):
    """A femoral plate that is plausible but above the typical adult 6,000-15,000 mm3 (the
    0.3.0 model on the real qDESS: 16,441 mm3, about twice pyKNEEr's) is a warning to look at
    the overlay, never a silent pass; below the plausible limit it stays a warning, not an
    error."""
    g = phantom.labels.geometry
    vox = g.voxel_volume_mm3
    base = (phantom.labels.array == S["femoral_cartilage"]).sum() * vox
    assert 6000 < base < 15000  # the phantom itself is typical
    lab = _with_femoral_volume(phantom, 15500)
    volume = (lab == S["femoral_cartilage"]).sum() * vox
    assert 15000 < volume < 18000
    flags = qc_checks(lab, g, side="right")
    mine = [f for f in flags if f.code == "plate_volume"]
    assert [(f.severity, f.structure) for f in mine] == [("warning", "femoral_cartilage")]
    assert "typical adult range 6000-15000 mm3" in mine[0].message
    assert QCResult(flags=flags).status in ("warn", "fail")
    # the typical phantom has no such flag
    assert not [f for f in qc_checks(phantom.labels.array, g, side="right")
                if f.code == "plate_volume"]
    # above the plausible limit: the error alone, not the warning as well
    lab = _with_femoral_volume(phantom, 18500)
    mine = [f for f in qc_checks(lab, g, side="right") if f.code == "plate_volume"]
    assert [f.severity for f in mine] == ["error"]


def test_huge_bml_fails_and_a_small_one_does_not(phantom):
    lab = phantom.labels.array.copy()
    g = phantom.labels.geometry
    femur = np.argwhere(lab == S["femur"])
    low = femur[:, 2] < np.percentile(femur[:, 2], 40)  # the distal 40% of the femur: marrow
    lab[tuple(femur[low].T)] = S["bone_marrow_lesion"]
    st, flags = status(lab, g, "right", measure=False)
    assert st == "fail"
    assert ("bml_volume", "bone_marrow_lesion") in errors(flags)
    assert ("bml_volume", "femur") in errors(flags)
    # the phantom's own lesion (about 500 mm3) is plausible
    assert not [f for f in qc_checks(phantom.labels.array, g, side="right") if f.code == "bml_volume"]


def test_plate_mostly_on_the_image_border_fails(phantom):
    lab = phantom.labels.array
    g = phantom.labels.geometry
    idx = np.argwhere(lab == S["medial_tibial_cartilage"])
    top = int(idx[:, 0].max()) - 2  # keep the last 3 index planes of the plate
    from cartiq.io.volume import Geometry

    origin = g.index_to_world(np.array([[top, 0, 0]]))[0]
    cut = Geometry(lab[top:].shape, g.spacing, tuple(origin), g.direction)
    flags = qc_checks(np.ascontiguousarray(lab[top:]), cut, side="right")
    border = [f for f in flags if f.code == "border" and f.structure == "medial_tibial_cartilage"]
    assert border and border[0].severity == "error" and border[0].value > 0.9
    # merely touching the border stays a warning
    lab2 = lab.copy()
    lab2[0, 5:12, 3] = S["femoral_cartilage"]
    touch = [f for f in qc_checks(lab2, g) if f.code == "border"]
    assert [(f.structure, f.severity) for f in touch] == [("femoral_cartilage", "warning")]


def test_cartilage_mostly_away_from_its_bone_fails(phantom):
    lab = phantom.labels.array.copy()
    g = phantom.labels.geometry
    pc = lab == S["patellar_cartilage"]
    dist = ndimage.distance_transform_edt(lab != S["patella"], sampling=g.spacing)
    far = np.argwhere((dist > 12) & (lab == 0))[: int(pc.sum())]  # as much again, > 12 mm away
    lab[tuple(far.T)] = S["patellar_cartilage"]
    flags = [f for f in qc_checks(lab, g) if f.code == "not_adjacent"]
    assert [(f.structure, f.severity) for f in flags] == [("patellar_cartilage", "error")]
    assert flags[0].value == pytest.approx(0.5, abs=0.05)
    # a few far voxels (< 25%) stay a warning
    lab[tuple(far[len(far) // 5:].T)] = 0
    flags = [f for f in qc_checks(lab, g) if f.code == "not_adjacent"]
    assert [(f.structure, f.severity) for f in flags] == [("patellar_cartilage", "warning")]


@pytest.mark.slow
def test_real_label_maps_never_fail(real_label_map):
    lab, g, side = real_label_map
    st, flags = status(lab, g, side)
    assert st != "fail", [f.message for f in flags if f.severity == "error"]


# ------------------------------------------------------------------ batch and report


def _dilated_twice(labels):
    lab = labels.copy()
    target = 2 * (lab == S["femoral_cartilage"]).sum()
    while (lab == S["femoral_cartilage"]).sum() < target:
        lab[ndimage.binary_dilation(lab == S["femoral_cartilage"]) & (lab == 0)] = \
            S["femoral_cartilage"]
    return lab


@pytest.mark.slow
def test_batch_leaves_qc_fail_scans_out_and_the_report_says_so(tmp_path):
    import pandas as pd

    from cartiq.batch.batch import BatchOptions, run_batch
    from cartiq.batch.cohort import write_cohort_tables
    from cartiq.batch.manifest import read_manifest_csv
    from cartiq.data.phantom import PhantomSpec, make_phantom, write_phantom
    from cartiq.io.volume import write_volume

    ph = make_phantom(PhantomSpec(seed=3, spacing_mm=(1.0, 1.0, 2.0)))
    paths = write_phantom(ph, tmp_path / "phantom")
    bad = write_volume(tmp_path / "broken.nii.gz", _dilated_twice(ph.labels.array),
                       ph.labels.geometry)
    csv = tmp_path / "manifest.csv"
    csv.write_text("subject_id,timepoint,image,seg,side\n"
                   f"S01,bl,{paths['image']},{paths['seg']},right\n"
                   f"S01,m6,{paths['image']},{bad},right\n")
    out = tmp_path / "out"
    res = run_batch(csv, BatchOptions(out=out, workers=1, reports=True))
    assert res.count("done") == 2 and res.exit_code == 0  # a QC fail is not a failed scan
    own = pd.read_csv(out / "S01" / "m6" / "measurements.csv")
    assert set(own.qc_status) == {"fail"}  # the numbers are written, and marked
    assert set(pd.read_csv(out / "S01" / "bl" / "measurements.csv").qc_status) == {"pass"}
    meas = pd.read_csv(out / "measurements.csv")
    assert set(meas.timepoint) == {"bl"} and set(meas.qc_status) == {"pass"}
    excl = pd.read_csv(out / "qc_excluded.csv")
    assert excl[["subject_id", "timepoint", "qc_status"]].values.tolist() == [["S01", "m6", "fail"]]
    assert "femoral_cartilage" in excl.reasons[0]
    change = out / "change.csv"
    assert not change.is_file() or len(pd.read_csv(change)) == 0  # no pair with a fail scan
    html = (out / "S01" / "report.html").read_text()
    top = html[html.index("<body>"):html.index("<h1>")]
    assert "QC FAIL" in top and "m6" in top and "femoral_cartilage" in top
    # --include-qc-fail keeps them
    write_cohort_tables(out, read_manifest_csv(csv), res.scans, res.compares, res.failures,
                        include_qc_fail=True)
    meas = pd.read_csv(out / "measurements.csv")
    assert set(meas.timepoint) == {"bl", "m6"} and set(meas.qc_status) == {"pass", "fail"}
    assert len(pd.read_csv(out / "qc_excluded.csv")) == 0


def test_include_qc_fail_option_reaches_the_batch(monkeypatch, tmp_path):
    import cartiq.batch.batch as batch_mod
    from cartiq.cli import main

    seen = {}

    def fake(manifest, opts, progress=None):
        seen["opts"] = opts
        raise SystemExit(0)

    monkeypatch.setattr(batch_mod, "run_batch", fake)
    for args, expect in (([], False), (["--include-qc-fail"], True)):
        with pytest.raises(SystemExit):
            main(["batch", str(tmp_path / "m.csv"), "-o", str(tmp_path / "o"), "--no-progress",
                  *args])
        assert seen["opts"].include_qc_fail is expect
