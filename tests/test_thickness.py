"""Surface thickness and areas on shapes with analytic truth, over anisotropic spacing."""

import numpy as np
import pytest

from cartiq.measurement.defects import partial_defects, rim_vertices
from cartiq.measurement.thickness import plate_surface, vertex_areas

from _shapes import shell, slab_with_hole, grid

SPACINGS = [(0.5, 0.5, 0.5), (0.4, 0.4, 1.0), (1.0, 0.35, 0.35), (0.3, 0.6, 0.45)]


def _mean_thickness(s):
    ok = s.covered & np.isfinite(s.thickness_mm)
    return np.average(s.thickness_mm[ok], weights=s.vertex_area_mm2[ok])


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("thickness", [2.0, 3.0])
def test_closed_shell_thickness_is_exact_within_3pct(spacing, thickness):
    bone, cart = shell(spacing, thickness=thickness)
    s = plate_surface(cart, bone, spacing)
    assert abs(_mean_thickness(s) / thickness - 1) < 0.03
    # the whole ball surface is covered: area 4 pi r^2 within 3%
    assert abs(s.total_area_mm2 / (4 * np.pi * 15.0 ** 2) - 1) < 0.03
    assert s.denuded_area_mm2 == 0


@pytest.mark.parametrize("spacing", SPACINGS)
def test_slab_hole_is_denuded_area(spacing):
    bone, cart = slab_with_hole(spacing, thickness=2.0, hole_radius=4.0)
    s = plate_surface(cart, bone, spacing)
    assert s.hole_id.max() == 1
    assert abs(s.denuded_area_mm2 / (np.pi * 4.0 ** 2) - 1) < 0.15
    assert abs(s.total_area_mm2 / (np.pi * 15.0 ** 2) - 1) < 0.05
    # far from the plate rim and the hole wall, thickness is the slab's
    c = s.points_mm.mean(axis=0)
    rho = np.hypot(s.points_mm[:, 0] - c[0], s.points_mm[:, 1] - c[1])
    mid = s.covered & (rho > 7) & (rho < 12)
    voxel_thickness = cart.any(axis=(0, 1)).sum() * spacing[2]  # the slab as sampled
    assert abs(np.median(s.thickness_mm[mid]) - voxel_thickness) < 0.06


def test_plate_edge_hole_is_not_a_defect():
    """A notch open to the plate's rim is a gap in extent, not an enclosed defect."""
    spacing = (0.5, 0.5, 0.5)
    X, Y, Z = grid((40, 40, 20), spacing)
    bone = Z < 0
    cart = (Z >= 0) & (Z < 2) & (np.hypot(X, Y) < 15) & ~((X > 10) & (np.abs(Y) < 3))
    s = plate_surface(cart, bone, spacing)
    assert s.denuded_area_mm2 == 0


def test_absent_plate_returns_none():
    bone, cart = shell((0.5, 0.5, 0.5))
    assert plate_surface(np.zeros_like(cart), bone, (0.5, 0.5, 0.5)) is None
    assert plate_surface(cart, np.zeros_like(bone), (0.5, 0.5, 0.5)) is None


def test_vertex_areas_sum_to_triangle_area():
    pts = np.array([[0, 0, 0], [2, 0, 0], [0, 3, 0.0]])
    assert np.isclose(vertex_areas(pts, np.array([[0, 1, 2]])).sum(), 3.0)


@pytest.mark.parametrize("spacing", [(0.5, 0.5, 0.5), (0.4, 0.4, 0.8)])
def test_partial_defect_found_inside_plate(spacing):
    X, Y, Z = grid((44, 44, 16), spacing)
    bone = Z < 0
    rho = np.hypot(X, Y)
    top = np.where(np.hypot(X - 2, Y + 1) < 3.5, 0.8, 2.4)  # 33% of 2.4 mm remains
    cart = (Z >= 0) & (Z < top) & (rho < 17)
    s = plate_surface(cart, bone, spacing)
    ids, expected = partial_defects(s.points_mm, s.faces, s.vertex_area_mm2, s.thickness_mm,
                                    s.covered, rim=rim_vertices(len(s.points_mm), s.faces, ~s.covered))
    assert ids.max() == 1, "exactly one partial defect (the plate's tapered rim is not one)"
    area = s.vertex_area_mm2[ids == 1].sum()
    assert abs(area / (np.pi * 3.5 ** 2) - 1) < 0.3
    assert abs(np.median(expected[ids == 1]) - 2.4) < 0.15
