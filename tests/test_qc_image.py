"""QC check that reads the image: a bone label drawn over tissue brighter than its marrow.

The truth is built into the arrays: a block of "marrow" (grey 100 +- noise) whose label runs
on over slices of bright "fluid" (grey 400) and, at the other end, over two slices of dark
"cortex" (grey 20): only the fluid slices are unlike the marrow."""

from __future__ import annotations

import numpy as np
import pytest

from cartiq.io.labels import default_scheme
from cartiq.io.volume import Geometry
from cartiq.measurement.qc import QCConfig, qc_checks
from cartiq.measurement.qc_image import BoneGreyLimits, bone_grey_problems, unlike_marrow_slices

SPACING = (0.5, 0.5, 1.5)  # axis 2 is the slice axis (the thickest)
GEOMETRY = Geometry((60, 60, 26), SPACING, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))


def _scan(fluid_slices=(20, 21, 22), cortex_slices=(3, 4)):
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 5.0, (60, 60, 26)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[10:50, 10:50, 5:20] = True          # the bone: marrow
    for k in fluid_slices:                   # the label runs on over bright fluid
        mask[10:50, 10:50, k] = True
        image[:, :, k] = rng.normal(400.0, 5.0, image.shape[:2])
    for k in cortex_slices:                  # and over dark cortex at the other end
        mask[10:50, 10:50, k] = True
        image[:, :, k] = rng.normal(20.0, 5.0, image.shape[:2])
    return image, mask


def test_only_the_slices_brighter_than_the_marrow_are_found():
    image, mask = _scan()
    hits = unlike_marrow_slices(image, mask, GEOMETRY, BoneGreyLimits())
    assert [k for k, _ in hits] == [20, 21, 22]
    assert all(n == 40 * 40 for _, n in hits)


def test_no_slice_is_found_in_a_bone_of_one_grey():
    image, mask = _scan(fluid_slices=(), cortex_slices=())
    assert unlike_marrow_slices(image, mask, GEOMETRY, BoneGreyLimits()) == []


def test_a_bone_too_thin_for_a_core_is_not_judged():
    image, mask = _scan()
    thin = np.zeros_like(mask)
    thin[10:12, 10:50, 5:23] = True  # 1 mm thick: nothing 3 mm inside it
    assert unlike_marrow_slices(image, thin, GEOMETRY, BoneGreyLimits()) == []


def test_the_volume_limit_decides_the_problem():
    image, mask = _scan()
    labels = mask.astype(np.uint8)
    volume = 3 * 40 * 40 * float(np.prod(SPACING))  # 1,800 mm3 on the fluid slices
    (bone, msg, value), = bone_grey_problems(image, labels, GEOMETRY, {"femur": 1},
                                             BoneGreyLimits(max_volume_mm3=volume - 1))
    assert bone == "femur" and value == pytest.approx(volume)
    assert "slice(s) 20, 21, 22" in msg
    assert bone_grey_problems(image, labels, GEOMETRY, {"femur": 1},
                              BoneGreyLimits(max_volume_mm3=volume + 1)) == []
    with pytest.raises(ValueError, match="shape"):
        bone_grey_problems(image[:, :, :10], labels, GEOMETRY, {"femur": 1}, BoneGreyLimits())


def test_qc_checks_flag_it_only_with_the_image():
    image, mask = _scan()
    s = default_scheme()
    labels = np.where(mask, s["femur"], 0).astype(np.uint8)
    cfg = QCConfig()
    flags = qc_checks(labels, GEOMETRY, config=cfg, image=image)
    grey = [f for f in flags if f.code == "bone_grey"]
    assert len(grey) == 1 and grey[0].severity == "warning" and grey[0].structure == "femur"
    assert not [f for f in qc_checks(labels, GEOMETRY, config=cfg) if f.code == "bone_grey"]
