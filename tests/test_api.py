"""The public Python API (docs/api.md): flat face, in-memory inputs, DataFrames in the CSV
contract, separate saving, one measurement per scan, errors as the CLI prints them."""

from __future__ import annotations

import json

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cartiq
from cartiq.data.phantom import PhantomSpec, knee_model, make_phantom
from cartiq.data.phantom_truth import plate_truth

DOCS = Path(__file__).resolve().parent.parent / "docs" / "api.md"
SPACING = (0.8, 0.8, 1.5)


@pytest.fixture(scope="module")
def phantoms():
    return (make_phantom(PhantomSpec(seed=1, spacing_mm=SPACING)),
            make_phantom(PhantomSpec(seed=2, spacing_mm=SPACING)))


@pytest.fixture(scope="module")
def scans(phantoms):
    return tuple(cartiq.measure(p.image, p.labels, side="right") for p in phantoms)


def test_public_face():
    need = {"read_volume", "segment", "measure", "score", "compare", "run_batch"}
    assert need <= set(cartiq.__all__)
    for name in need:
        assert callable(getattr(cartiq, name))
    # importing cartiq loads no stage and no heavy dependency
    code = "import sys, cartiq; print(sorted(m for m in ('torch', 'pandas', 'SimpleITK', " \
           "'cartiq._api', 'cartiq.measurement.measure') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_measure_in_memory_matches_the_truth_and_the_csv_contract(scans, phantoms, tmp_path):
    from cartiq.measurement.outputs import DEFECT_COLUMNS, LESION_COLUMNS, MEASUREMENT_COLUMNS

    scan = scans[0]
    assert list(scan.measurements.columns) == MEASUREMENT_COLUMNS
    assert list(scan.defects.columns) == DEFECT_COLUMNS
    assert list(scan.lesions.columns) == LESION_COLUMNS
    assert scan.side == "right"
    truth = plate_truth(knee_model(PhantomSpec(seed=1, spacing_mm=SPACING)), 0.1)
    truth = truth["femoral_cartilage"]["thickness_mean_mm"]
    m = scan.measurements
    sel = m[(m.structure == "femoral_cartilage") & (m.region == "all")
            & (m.metric == "thickness_median")]
    assert float(sel.value.iloc[0]) == pytest.approx(truth, rel=0.05)
    # saving writes the CLI's folder, with the same tables
    out = scan.save(tmp_path / "scan")
    on_disk = pd.read_csv(out / "measurements.csv")
    assert len(on_disk) == len(m)
    np.testing.assert_allclose(on_disk.value.to_numpy(float), m.value.to_numpy(float),
                               rtol=1e-3, equal_nan=True)  # the CSV keeps 5 digits
    assert (out / "manifest.json").is_file() and (out / "measurement.npz").is_file()


def test_bad_inputs_raise_one_clear_cartiq_error(phantoms):
    from cartiq.io.volume import Geometry, Volume

    ph = phantoms[0]
    with pytest.raises(cartiq.errors.InputError, match="without geometry"):
        cartiq.measure(ph.image.array, ph.labels)
    g = ph.labels.geometry
    other = Volume(ph.labels.array, Geometry(g.shape, tuple(s * 2 for s in g.spacing),
                                             g.origin, g.direction))
    with pytest.raises(cartiq.errors.InputError) as e:
        cartiq.measure(ph.image, other)
    assert "\n" not in str(e.value)


def test_a_side_the_anatomy_contradicts_needs_side_override(phantoms, tmp_path):
    ph = phantoms[0]  # a right knee: its fibula and plates say so
    with pytest.raises(cartiq.errors.InputError, match="--side says left but the"):
        cartiq.measure(ph.image, ph.labels, side="left")
    kept = cartiq.measure(ph.image, ph.labels, side="left", side_override=True)
    assert kept.side == "left"
    man = json.loads((kept.save(tmp_path / "scan") / "manifest.json").read_text())
    assert man["side"] == "left" and man["side_check"]["overridden"] is True
    assert man["side_check"]["anatomy"] == "right"


def test_compare_and_score_reuse_the_measurements(scans, monkeypatch):
    import cartiq.measurement.measure as M

    calls = []
    original = M.measure_labels
    monkeypatch.setattr(M, "measure_labels", lambda *a, **k: calls.append(1) or original(*a, **k))
    change = cartiq.compare(*scans)
    scores = cartiq.score(scans[0])
    assert calls == []
    assert change.status in ("ok", "partial")
    assert {"structure", "region", "metric", "baseline", "followup", "change", "unit"} \
        <= set(change.change.columns)
    fem = change.change[(change.change.structure == "femoral_cartilage")
                        & (change.change.region == "all")
                        & (change.change.metric == "thickness_mean")].iloc[0]
    base = scans[0].measurements
    b = base[(base.structure == "femoral_cartilage") & (base.region == "all")
             & (base.metric == "thickness_mean")].value.iloc[0]
    assert fem.baseline == pytest.approx(b, rel=1e-3)  # change.csv rounds
    assert len(scores.rows()) > 0


def test_saved_measurement_reproduces_a_fresh_one(scans, tmp_path, monkeypatch):
    """The comparison from saved surfaces equals the comparison that measures again."""
    import cartiq.measurement.store as store
    from cartiq.longitudinal.compare import compare_scans

    a, b = (s.save(tmp_path / n) for s, n in zip(scans, ("a", "b")))
    reused = compare_scans(a, b, tmp_path / "c1")
    monkeypatch.setattr(store, "load_if_current", lambda *a, **k: None)  # measure again
    fresh = compare_scans(a, b, tmp_path / "c2")
    x = pd.read_csv(reused.out_dir / "change.csv")
    y = pd.read_csv(fresh.out_dir / "change.csv")
    assert len(x) == len(y) > 50
    # NIfTI keeps the spacing in float32: the re-measured volumes differ in the 7th digit
    pd.testing.assert_frame_equal(x, y, rtol=1e-6, atol=2e-4, check_dtype=False)


def test_docs_example_runs(tmp_path):
    text = DOCS.read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    ns = {"OUT": tmp_path}
    exec(compile(code, str(DOCS), "exec"), ns)  # noqa: S102 - our own documentation
    assert (tmp_path / "baseline" / "manifest.json").is_file()
    assert (tmp_path / "change" / "change.csv").is_file()


def test_thickness_map_respects_its_distance_cap(phantoms):
    from cartiq.config import MeasureConfig
    from cartiq.measurement.measure import measure_labels

    ph = phantoms[0]
    default = measure_labels(ph.labels.array, ph.labels.geometry, side="right")
    capped = measure_labels(ph.labels.array, ph.labels.geometry, side="right",
                            config=MeasureConfig(thickness={"map_max_distance_mm": 0.5}))
    full, near = np.count_nonzero(default.thickness_map), np.count_nonzero(capped.thickness_map)
    assert full > 0 and 0 < near < 0.8 * full  # voxels > 0.5 mm from the tAB get no value


def test_in_memory_result_marks_a_broken_segmentation(phantoms, tmp_path):
    from scipy import ndimage

    from cartiq.io.labels import default_scheme
    from cartiq.io.volume import Volume

    ph = phantoms[0]
    good = cartiq.measure(ph.image, ph.labels, side="right")
    assert good.qc_status != "fail" and set(good.measurements.qc_status) == {good.qc_status}
    s = default_scheme()
    arr = ph.labels.array.copy()  # femoral cartilage grown into the soft tissue: ~2x volume
    grown = ndimage.binary_dilation(arr == s["femoral_cartilage"], iterations=3) & (arr == 0)
    arr[grown] = s["femoral_cartilage"]
    bad = cartiq.measure(ph.image, Volume(arr, ph.labels.geometry), side="right")
    assert bad.qc_status == "fail"
    assert set(bad.measurements.qc_status) == {"fail"}  # no unmarked number, before saving
    out = bad.save(tmp_path / "bad")
    assert set(pd.read_csv(out / "measurements.csv").qc_status) == {"fail"}
