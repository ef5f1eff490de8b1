"""The segmenter's clean-up of bone drawn over tissue brighter than its marrow at a bone's ends.

The truth is built into the arrays: a block of "marrow" (grey 100 +- noise) whose label runs
on at one end over slices of bright "fluid" (grey 400), with "cartilage" along it on every
slice; only the fluid slices at the end, their cartilage included, are to go."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cartiq.io.volume import Geometry, Volume
from cartiq.segmentation.marrow import BoneGreyLimits, drop_unlike_marrow, end_runs
from cartiq.segmentation.post import bone_cartilage_values

SPACING = (0.5, 0.5, 1.5)  # axis 2 is the slice axis (the thickest)
GEOMETRY = Geometry((60, 60, 30), SPACING, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
BONE, CART = 1, 4


def _scan(fluid_slices=(20, 21, 22), inner_fluid=None):
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 5.0, GEOMETRY.shape).astype(np.float32)
    labels = np.zeros(GEOMETRY.shape, np.uint8)
    labels[10:50, 10:50, 5:20] = BONE
    for k in fluid_slices:
        labels[10:50, 10:50, k] = BONE
        image[:, :, k] = rng.normal(400.0, 5.0, image.shape[:2])
    if inner_fluid is not None:  # a bright slice in the middle of the bone
        image[:, :, inner_fluid] = rng.normal(400.0, 5.0, image.shape[:2])
    last = max((5, 19, *fluid_slices))
    labels[50:53, 10:50, 5:last + 1] = CART  # cartilage along the bone on every slice
    return image, labels


def test_end_runs_take_flagged_and_unjudged_slices_from_each_end_only():
    per = np.array([0, 5, 50, 50, 50, 50, 50, 50, 10, 0])
    # slice 2 flagged behind the unjudged slice 1; slice 7 flagged before the unjudged 8
    assert end_runs(per, {2, 7}, 20) == [1, 2, 7, 8]
    # a flagged slice in the middle is never removed, nor is a run without a flagged slice
    assert end_runs(per, {4}, 20) == []
    # unjudged slices inward of the innermost flagged one stay
    per2 = np.array([50, 60, 5, 50, 50])
    assert end_runs(per2, {0}, 20) == [0]
    assert end_runs(np.zeros(5, int), {1}, 20) == []


def test_bone_and_its_cartilage_go_on_the_bright_end_slices():
    image, labels = _scan()
    before = labels.copy()
    records = drop_unlike_marrow(labels, image, GEOMETRY, {BONE: [CART]}, BoneGreyLimits(),
                                 names={BONE: "femur", CART: "femoral_cartilage"})
    vox = float(np.prod(SPACING))
    (rec,) = records
    assert rec["bone"] == "femur" and rec["slices"] == [20, 21, 22]
    assert rec["removed_mm3"] == {"femur": pytest.approx(3 * 1600 * vox),
                                  "femoral_cartilage": pytest.approx(3 * 120 * vox)}
    assert not np.isin(labels[:, :, 20:23], [BONE, CART]).any()
    assert np.array_equal(labels[:, :, :20], before[:, :, :20])  # nothing else changed


def test_a_bright_slice_inside_the_bone_is_kept():
    image, labels = _scan(fluid_slices=(), inner_fluid=12)
    before = labels.copy()
    assert drop_unlike_marrow(labels, image, GEOMETRY, {BONE: [CART]}, BoneGreyLimits()) == []
    assert np.array_equal(labels, before)


def test_a_bone_mostly_unlike_its_core_is_left_for_qc(caplog):
    image, labels = _scan(fluid_slices=tuple(range(20, 30)))
    # 10 bright slices of 25: under half - removed; with max_fraction 0.3 - left as it is
    before = labels.copy()
    assert drop_unlike_marrow(labels.copy(), image, GEOMETRY, {BONE: [CART]}, BoneGreyLimits())
    assert drop_unlike_marrow(labels, image, GEOMETRY, {BONE: [CART]}, BoneGreyLimits(),
                              max_fraction=0.3) == []
    assert np.array_equal(labels, before)
    assert "left as it is" in caplog.text


def test_shapes_must_agree():
    image, labels = _scan()
    with pytest.raises(ValueError, match="shape"):
        drop_unlike_marrow(labels, image[:, :, :10], GEOMETRY, {BONE: [CART]}, BoneGreyLimits())


def test_bone_cartilage_values_follow_the_label_names():
    names = {1: "femur", 2: "tibia", 4: "femoral_cartilage", 5: "tibial_cartilage", 9: "fibula"}
    assert bone_cartilage_values(names) == {1: [4], 2: [5]}


def test_segmenter_removes_them_and_says_so(tmp_path, monkeypatch):
    """The segmenter's own clean-up, on a prediction with the femur run on over bright
    fluid: removed and recorded in the segmentation's info and manifest; kept when the
    clean-up is switched off."""
    from test_segment import _tiny_package  # tests/ is on sys.path (pytest's rootless test folder)
    from cartiq.segmentation.segmenter import Segmenter, segment_file
    from cartiq.io.volume import write_volume

    image, labels = _scan()
    raw = labels.copy()  # model output values: 1 femur, 4 femoral cartilage
    vol = Volume(image, GEOMETRY)
    pkg = _tiny_package(tmp_path / "tiny")
    monkeypatch.setattr(Segmenter, "_predict", lambda self, volume: raw.copy())
    res = Segmenter(pkg, device="cpu").run(vol, side="right")
    (rec,) = res.info["cleanup"]["bone_unlike_marrow"]
    assert rec["bone"] == "femur" and rec["slices"] == [20, 21, 22]
    assert not res.labels[:, :, 20:23].any()
    kept = Segmenter(pkg, device="cpu", drop_unlike_marrow=False).run(vol, side="right")
    assert kept.info["cleanup"] == {"bone_unlike_marrow": []}
    assert kept.labels[:, :, 20:23].any()
    img = write_volume(tmp_path / "scan.nii.gz", image, GEOMETRY)
    # the test's block is smaller than a knee; the knee-size check is tested elsewhere
    monkeypatch.setattr("cartiq.segmentation.segmenter.check_knee_found", lambda *a: None)
    _, manifest = segment_file(img, tmp_path / "out", model=pkg, device="cpu", side="right")
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert written["cleanup"]["bone_unlike_marrow"][0]["slices"] == [20, 21, 22]
