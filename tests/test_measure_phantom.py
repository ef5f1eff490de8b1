"""Measurement accuracy on the knee phantom, against its analytic truth (issue 2, item 8),
in two storage orientations (the oblique sagittal acquisition as generated, and the same
voxels re-stored with permuted and flipped axes), through the files as a user runs it."""

import numpy as np
import pytest

from cartiq.io.volume import Volume
from cartiq.measurement.measure import run_measure
from cartiq.io.orient import reorient
from cartiq.data.phantom import Phantom, PhantomSpec, make_phantom, write_phantom

PLATES = ["femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage",
          "patellar_cartilage"]


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(PhantomSpec(seed=3, partial_defect_depth_fraction=0.7))


def _restored(ph: Phantom) -> Phantom:
    order, flip = (2, 0, 1), (True, False, True)
    img, geo = reorient(ph.image.array, ph.image.geometry, order, flip)
    lab, _ = reorient(ph.labels.array, ph.labels.geometry, order, flip)
    return Phantom(image=Volume(img, geo), labels=Volume(lab, geo), truth=ph.truth)


@pytest.fixture(scope="module", params=["as_acquired", "restored"])
def measured(request, phantom, tmp_path_factory):
    ph = phantom if request.param == "as_acquired" else _restored(phantom)
    folder = tmp_path_factory.mktemp(request.param)
    paths = write_phantom(ph, folder)
    run = run_measure(paths["image"], paths["seg"], folder / "out")
    values = {(r["structure"], r["region"], r["metric"]): r["value"] for r in run.result.rows}
    return ph, run, values


@pytest.mark.parametrize("plate", PLATES)
def test_thickness_mean_within_3pct_of_truth(measured, plate):
    ph, _, v = measured
    truth = ph.truth["plates"][plate]["thickness_mean_mm"]
    assert abs(v[(plate, "all", "thickness_mean")] / truth - 1) < 0.03
    # away from rims and defects the thickness is the nominal one (up to voxel steps)
    nominal = ph.truth["plates"][plate]["nominal_thickness_mm"]
    assert abs(v[(plate, "all", "thickness_median")] - nominal) < 0.15 * nominal


@pytest.mark.parametrize("plate", PLATES)
def test_volume_and_areas_match_the_analytic_truth(measured, plate):
    # the truths are integrals over the phantom's continuous shapes (phantom_truth), not
    # voxel counts: measured on the default grid, volume -0.3..0%, tAB and cAB 0..+1%
    ph, _, v = measured
    t = ph.truth["plates"][plate]
    assert abs(v[(plate, "all", "volume")] / t["volume_mm3"] - 1) < 0.01
    assert abs(v[(plate, "all", "interface_area")] / t["interface_area_mm2"] - 1) < 0.02
    assert abs(v[(plate, "all", "covered_area")] / t["covered_area_mm2"] - 1) < 0.02


def test_denuded_area_within_15pct(measured):
    ph, run, v = measured
    truth = ph.truth["plates"]["femoral_cartilage"]["denuded_area_mm2"]
    assert abs(v[("femoral_cartilage", "all", "denuded_area")] / truth - 1) < 0.15
    full = [d for d in run.result.defects if d.kind == "full"]
    assert len(full) == 1 and full[0].plate == "femoral_cartilage"
    centre = next(d for d in ph.truth["defects"] if d["kind"] == "full")["centre_world_mm"]
    assert np.linalg.norm(full[0].centroid_world - centre) < 1.5
    for plate in PLATES[1:]:
        assert v[(plate, "all", "denuded_area")] == 0


def test_partial_defect_found_where_planted(measured):
    ph, run, _ = measured
    truth = next(d for d in ph.truth["defects"] if d["kind"] == "partial")
    partial = [d for d in run.result.defects if d.kind == "partial"]
    assert partial and all(d.plate == truth["plate"] for d in partial)
    # the thin patch is the planted footprint plus the margin where the defect's floor is
    # the nearest articular surface (up to ~1 mm wide here): at most (r + 1.05)^2 / r^2
    area = sum(d.area_mm2 for d in partial)
    r = truth["radius_mm"]
    assert 0.6 * truth["area_mm2"] < area < ((r + 1.05) / r) ** 2 * truth["area_mm2"]
    assert min(np.linalg.norm(d.centroid_world - truth["centre_world_mm"]) for d in partial) < 3.0


def test_bml_volume_within_5pct(measured):
    ph, run, v = measured
    for lesion_truth in ph.truth["lesions"]:
        found = [l for l in run.result.lesions if l.bone == lesion_truth["bone"]]
        assert len(found) == 1, lesion_truth["bone"]
        assert abs(found[0].volume_mm3 / lesion_truth["volume_mm3"] - 1) < 0.05
        assert np.linalg.norm(found[0].centroid_world - lesion_truth["centre_world_mm"]) < 1.0
        assert abs(found[0].max_diameter_mm - lesion_truth["max_diameter_mm"]) < 1.5
    total = sum(l["volume_mm3"] for l in ph.truth["lesions"])
    assert abs(v[("bone_marrow_lesion", "all", "volume")] / total - 1) < 0.05
    assert v[("bone_marrow_lesion", "all", "lesion_count")] == len(ph.truth["lesions"])


def test_subregions_present(measured):
    _, run, v = measured
    regions = {r for (s, r, _) in v if s == "femoral_cartilage"}
    assert {"cMF", "ecMF", "ccMF", "icMF", "cLF", "TrF"} <= regions
    assert {"cMT", "aMT", "pMT", "eMT", "iMT"} <= {r for (s, r, _) in v if s == "medial_tibial_cartilage"}
    # the full-thickness defect sits in the medial weight-bearing condyle
    full = next(d for d in run.result.defects if d.kind == "full")
    assert full.region.endswith("MF")
