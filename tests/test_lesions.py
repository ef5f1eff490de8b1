"""Bone-marrow lesion sizes against analytic ellipsoids and a brute-force oracle."""

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from cartiq.measurement.lesions import find_lesions, max_diameter_mm

from _shapes import ellipsoid


@pytest.mark.parametrize("spacing", [(0.5, 0.5, 0.5), (0.4, 0.4, 1.0), (1.2, 0.45, 0.45)])
def test_ellipsoid_volume_diameter_and_bone(spacing):
    les = ellipsoid(spacing, (6.0, 4.0, 3.5), extent=30)
    labels = np.full(les.shape, 2, np.uint8)  # all tibia
    labels[les] = 10
    labels[:, :, -3:] = 1  # a slab of femur far away
    found = find_lesions(labels, spacing, bml_label=10, bones={"femur": 1, "tibia": 2, "patella": 3},
                         slice_axis=int(np.argmax(spacing)))
    assert len(found) == 1
    c = found[0]
    assert c.bone == "tibia"
    assert abs(c.volume_mm3 / (4 / 3 * np.pi * 6 * 4 * 3.5) - 1) < 0.05
    assert abs(c.max_diameter_mm - 12.0) < max(spacing) + 0.1


def test_max_diameter_matches_brute_force_on_centres():
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 20, size=(300, 3)).astype(float)
    spacing = np.array([0.5, 0.7, 1.1])
    d = pdist(pts * spacing).max()
    got = max_diameter_mm(pts, spacing)
    assert d <= got <= d + np.linalg.norm(spacing) + 1e-9


def test_small_lesions_dropped_and_sorted_by_volume():
    labels = np.full((40, 40, 40), 1, np.uint8)
    labels[5:7, 5:7, 5:7] = 10  # 8 voxels = 8 mm3
    labels[20:30, 20:30, 20:30] = 10  # 1000 mm3
    labels[32:35, 5:8, 5:8] = 10  # 27 mm3
    found = find_lesions(labels, (1.0, 1.0, 1.0), bml_label=10, bones={"femur": 1},
                         slice_axis=2, min_volume_mm3=10)
    assert [round(c.volume_mm3) for c in found] == [1000, 27]
    assert found[0].max_slice_area_mm2 == 100
    assert [c.id for c in found] == [1, 2]


def test_no_lesions():
    assert find_lesions(np.zeros((5, 5, 5), np.uint8), (1, 1, 1), bml_label=10,
                        bones={"femur": 1}, slice_axis=2) == []


@pytest.mark.parametrize("spacing", [(0.5, 0.5, 0.5), (0.4, 0.4, 1.0), (1.2, 0.45, 0.45)])
def test_diameter_is_skimage_feret_of_a_convex_lesion(spacing):
    """Our Feret diameter (hull vertices only) equals regionprops' feret_diameter_max (every
    surface vertex of the convex image) on the same mask: an independent implementation;
    on the lesion itself it is within a voxel of the ellipsoid's 10 mm."""
    from skimage.measure import regionprops

    from cartiq.measurement.lesions import feret_diameter_mm

    les = ellipsoid(spacing, (5.0, 3.0, 2.5), extent=14)
    labels = np.where(les, 10, 2).astype(np.uint8)
    (c,) = find_lesions(labels, spacing, bml_label=10, bones={"tibia": 2}, slice_axis=0)
    (ref,) = regionprops(les.astype(np.uint8), spacing=spacing)
    assert feret_diameter_mm(ref.image_convex, spacing) == pytest.approx(ref.feret_diameter_max,
                                                                         abs=1e-6)
    assert c.max_diameter_mm <= ref.feret_diameter_max + 1e-6  # the lesion is inside its hull
    assert abs(c.max_diameter_mm - 10.0) < max(spacing)
    assert c.volume_mm3 == pytest.approx(les.sum() * np.prod(spacing))


def test_diameter_of_voxel_lines():
    """n voxels in a row are n voxel edges long; one voxel is its largest edge."""
    spacing = np.array([0.4, 0.7, 1.1])
    assert max_diameter_mm(np.zeros((1, 3)), spacing) == pytest.approx(1.1)
    for axis in range(3):
        pts = np.zeros((6, 3))
        pts[:, axis] = np.arange(6)
        assert max_diameter_mm(pts, spacing) == pytest.approx(max(6 * spacing[axis], spacing.max()))
