"""Knee phantom: determinism, geometry of the written files, label/truth consistency."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from cartiq.errors import ConfigError
from cartiq.io.volume import check_same_geometry, read_volume
from cartiq.io.labels import default_scheme
from cartiq.data.phantom import (PhantomSpec, grid_geometry, knee_model, make_phantom,
                              spec_from_options, write_phantom)
from cartiq.data.phantom_truth import plate_truth, slab_thickness_samples

PLATES = ("femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage",
          "patellar_cartilage")
COARSE = (0.9, 0.9, 1.5)
MOVED = dict(rotation_deg=(6.0, -4.0, 8.0), translation_mm=(6.0, -5.0, 4.0))


@pytest.fixture(scope="module")
def default_phantom():
    return make_phantom(PhantomSpec(seed=0))


@pytest.fixture(scope="module")
def moved_left(tmp_path_factory):
    spec = PhantomSpec(seed=1, side="left", spacing_mm=COARSE, **MOVED)
    ph = make_phantom(spec)
    folder = tmp_path_factory.mktemp("phantom")
    return ph, write_phantom(ph, folder)


def _model_labels_from_world(truth: dict, world: np.ndarray) -> np.ndarray:
    """Independent re-evaluation: truth's knee_to_world transform -> implicit model."""
    k2w = truth["knee_to_world"]
    rot = np.asarray(k2w["rotation_matrix"])
    p = (world - np.asarray(k2w["translation_mm"])) @ rot
    if k2w["mirror_x"]:
        p[:, 0] *= -1.0
    spec = PhantomSpec(**{k: (tuple(v) if isinstance(v, list) else v)
                          for k, v in truth["spec"].items()})
    return knee_model(spec).labels_at(p)


def test_deterministic_for_a_seed():
    spec = PhantomSpec(seed=7, spacing_mm=COARSE)
    a, b = make_phantom(spec), make_phantom(spec)
    np.testing.assert_array_equal(a.image.array, b.image.array)
    np.testing.assert_array_equal(a.labels.array, b.labels.array)
    assert a.truth == b.truth
    c = make_phantom(PhantomSpec(seed=8, spacing_mm=COARSE))
    np.testing.assert_array_equal(a.labels.array, c.labels.array)  # anatomy is not random
    assert np.mean(a.image.array != c.image.array) > 0.5  # noise is


def test_grid_is_oblique_and_anisotropic(default_phantom):
    g = default_phantom.labels.geometry
    assert g.spacing == (0.45, 0.45, 1.0)
    d = g.matrix
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-12)
    assert np.abs(d).max(axis=0).min() < 0.99  # no index axis along a world axis
    assert np.argmax(np.abs(d[:, 2])) == 0  # slices are sagittal: slice axis ~ left-right
    assert default_phantom.image.array.dtype == np.int16


def test_written_files_round_trip_and_labels_match_model(moved_left):
    ph, paths = moved_left
    img = read_volume(paths["image"])
    seg = read_volume(paths["seg"], kind="labels")
    check_same_geometry(ph.labels.geometry, seg.geometry, None, paths["seg"], tol_mm=1e-4)
    check_same_geometry(ph.labels.geometry, img.geometry, None, paths["image"], tol_mm=1e-4)
    np.testing.assert_array_equal(seg.array, ph.labels.array)
    np.testing.assert_array_equal(img.array, ph.image.array)
    truth = json.loads(paths["truth"].read_text())
    # voxel centres of the written file, mapped to world with its geometry, re-evaluated
    rng = np.random.default_rng(0)
    lab = seg.array
    idx = rng.integers(0, np.array(lab.shape), size=(20000, 3))
    fg = np.argwhere(lab > 0)
    idx = np.concatenate([idx, fg[rng.integers(0, len(fg), 20000)]])
    want = _model_labels_from_world(truth, seg.geometry.index_to_world(idx))
    got = lab[idx[:, 0], idx[:, 1], idx[:, 2]]
    # float32 NIfTI header rounding may flip points lying within ~1e-4 mm of a boundary
    assert np.mean(got != want) < 1e-3
    assert set(np.unique(lab)) == set(range(11))


def test_label_volumes_match_analytic_volumes(default_phantom):
    truth = default_phantom.truth
    for name in PLATES:
        row = truth["plates"][name]
        assert row["label_volume_mm3"] == pytest.approx(row["volume_mm3"], rel=0.02), name
    for name, row in truth["menisci"].items():
        assert row["label_volume_mm3"] == pytest.approx(row["volume_mm3"], rel=0.02), name
    s = default_scheme()
    lab = default_phantom.labels.array
    bml, n = ndimage.label(lab == s["bone_marrow_lesion"])
    assert n == len(truth["lesions"]) == 2
    vv = default_phantom.labels.geometry.voxel_volume_mm3
    centres = ndimage.center_of_mass(np.ones_like(bml), bml, range(1, n + 1))
    geo = default_phantom.labels.geometry
    for lesion in truth["lesions"]:
        world = geo.index_to_world(np.asarray(centres))
        k = int(np.argmin(np.linalg.norm(world - lesion["centre_world_mm"], axis=1)))
        assert np.linalg.norm(world[k] - lesion["centre_world_mm"]) < 0.5
        vol = np.count_nonzero(bml == k + 1) * vv
        assert vol == pytest.approx(lesion["volume_mm3"], rel=0.02), lesion["bone"]
        assert lesion["volume_mm3"] == pytest.approx(
            4 / 3 * math.pi * np.prod(lesion["semi_axes_mm"]))


def test_plate_areas_and_defects(default_phantom):
    truth = default_phantom.truth
    fem = truth["plates"]["femoral_cartilage"]
    assert fem["denuded_area_mm2"] == pytest.approx(math.pi * 4.0 ** 2)
    assert fem["interface_area_mm2"] == pytest.approx(2 * 25 * 20 * math.radians(200))
    assert fem["covered_area_mm2"] == pytest.approx(
        fem["interface_area_mm2"] - fem["denuded_area_mm2"])
    kinds = {d["kind"]: d for d in truth["defects"]}
    assert kinds["full"]["plate"] == "femoral_cartilage"
    assert kinds["partial"]["area_mm2"] == pytest.approx(math.pi * 3.5 ** 2)
    assert kinds["partial"]["depth_fraction"] == 0.6
    # the full defect really is bare bone: no cartilage voxel within 3 mm of its centre
    geo = default_phantom.labels.geometry
    c = geo.world_to_index(np.asarray([kinds["full"]["centre_world_mm"]]))[0]
    lab = default_phantom.labels.array
    lo = np.maximum(0, np.floor(c - 3.0 / np.array(geo.spacing))).astype(int)
    hi = np.ceil(c + 3.0 / np.array(geo.spacing)).astype(int) + 1
    box = np.argwhere(lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
                      == default_scheme()["femoral_cartilage"]) + lo
    dist = np.linalg.norm(geo.index_to_world(box) - kinds["full"]["centre_world_mm"], axis=1)
    assert dist.min() > 3.0


def test_cartilage_plates_do_not_touch(default_phantom):
    s = default_scheme()
    lab = default_phantom.labels.array
    near_fc = ndimage.binary_dilation(lab == s["femoral_cartilage"], np.ones((3, 3, 3), bool))
    for other in ("medial_tibial_cartilage", "lateral_tibial_cartilage", "patellar_cartilage",
                  "medial_meniscus", "lateral_meniscus", "tibia", "patella"):
        assert not np.any(near_fc & (lab == s[other])), other


def test_orientations_give_the_same_truth():
    a = make_phantom(PhantomSpec(orientation="axial", spacing_mm=COARSE)).truth
    b = make_phantom(PhantomSpec(orientation="coronal", spacing_mm=(0.7, 0.7, 2.0))).truth
    assert a["geometry"]["direction"] != b["geometry"]["direction"]
    for name in PLATES:
        ra, rb = dict(a["plates"][name]), dict(b["plates"][name])
        assert ra.pop("label_volume_mm3") != rb.pop("label_volume_mm3")
        assert ra == rb
    assert a["defects"] == b["defects"] and a["lesions"] == b["lesions"]


def test_left_knee_mirrors_right():
    kw = dict(orientation="axial", spacing_mm=(0.9, 0.9, 1.5))
    r = make_phantom(PhantomSpec(side="right", **kw))
    lft = make_phantom(PhantomSpec(side="left", **kw))
    # the axial grid is centred on the knee's mid-sagittal plane: flipping i mirrors x
    agree = np.mean(lft.labels.array == r.labels.array[::-1])
    assert agree > 0.9999
    off = np.asarray(PhantomSpec().world_offset_mm)
    for dr, dl in zip(r.truth["defects"], lft.truth["defects"]):
        cr, cl = np.asarray(dr["centre_world_mm"]) - off, np.asarray(dl["centre_world_mm"]) - off
        np.testing.assert_allclose(cl, cr * [-1, 1, 1], atol=1e-6)
    for name in PLATES:
        ra, rl = dict(r.truth["plates"][name]), dict(lft.truth["plates"][name])
        assert rl.pop("label_volume_mm3") == pytest.approx(ra.pop("label_volume_mm3"), rel=1e-3)
        assert ra == rl
    # the defect is on the medial condyle: patient left (+x) of a right knee, right of a left
    assert lft.truth["defects"][0]["centre_world_mm"][0] < off[0] < r.truth["defects"][0][
        "centre_world_mm"][0]


def test_rigid_motion_moves_truth_consistently():
    base = make_phantom(PhantomSpec(spacing_mm=COARSE)).truth
    moved = make_phantom(PhantomSpec(spacing_mm=COARSE, **MOVED)).truth
    for name in PLATES:
        assert moved["plates"][name]["thickness_mean_mm"] == base["plates"][name][
            "thickness_mean_mm"]
    shift = np.linalg.norm(np.subtract(moved["defects"][0]["centre_world_mm"],
                                       base["defects"][0]["centre_world_mm"]))
    assert shift > 5.0


def test_slab_thickness_truth_matches_closed_form():
    # tAB to AC: the side wall is not articular, so a plain slab is T everywhere
    a, T = 15.0, 2.0
    _, d = slab_thickness_samples(a, a, T, 0.1)
    assert np.all(d == T)
    # partial defect (floor f = (1 - depth) T, radius r, centred): f inside; outside, at
    # distance delta from its rim, the floor's edge is nearer than the top while hypot < T
    r, depth = 4.0, 0.6
    f = (1 - depth) * T
    _, d = slab_thickness_samples(a, a, T, 0.05, (0.0, 0.0, r, depth))
    rho = (np.arange(300000) + 0.5) * a / 300000
    t = np.where(rho < r, f, np.minimum(T, np.hypot(rho - r, f)))
    assert np.mean(d) == pytest.approx(float(np.sum(t * rho) / np.sum(rho)), abs=0.005)


def test_truth_sampling_error_is_small():
    m = knee_model(PhantomSpec())
    coarse, fine = plate_truth(m, 0.2), plate_truth(m, 0.1)
    for name in PLATES:
        assert abs(coarse[name]["thickness_mean_mm"] - fine[name]["thickness_mean_mm"]) < 0.005
        assert fine[name]["thickness_max_mm"] == pytest.approx(
            fine[name]["nominal_thickness_mm"], abs=1e-9)


def test_femoral_thickness_is_nominal_with_and_without_defect():
    # AC is the outer cylinder: side faces, end faces and the defect wall are not articular
    for spec in (PhantomSpec(), PhantomSpec(full_defect_radius_mm=0.0)):
        m = knee_model(spec)
        t = plate_truth(m, 0.1)["femoral_cartilage"]
        assert t["thickness_mean_mm"] == pytest.approx(m.T_f, abs=1e-9)


def test_bad_spec_raises_config_error():
    with pytest.raises(ConfigError):
        make_phantom(PhantomSpec(side="middle"))
    with pytest.raises(ConfigError):
        make_phantom(PhantomSpec(full_defect_radius_mm=20.0))
    with pytest.raises(ConfigError):
        spec_from_options(spacing="1,2")
    assert grid_geometry(spec_from_options(spacing="1,1,2")).spacing == (1.0, 1.0, 2.0)
