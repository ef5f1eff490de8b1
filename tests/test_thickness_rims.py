"""Thickness from tAB to the articular surface at plate rims (issue 13, items 1-2).

Plates with blunt (wall) and tapered rims, flat (tibia-like) and curved (femoral condyle),
rendered on an oblique anisotropic grid and re-stored with permuted, flipped axes; the truth
is the analytic mean/median over cAB (cartiq.data.rim_phantoms, from the geometry).
"""

from functools import lru_cache

import numpy as np
import pytest

from cartiq.data.rim_phantoms import RIM_PLATES, render_rim_plate, rim_plate_truth
from cartiq.measurement.thickness import plate_surface

from _shapes import mini_knee
from _cli import run_cartiq as _cartiq


@lru_cache(maxsize=None)
def _truth(name):
    return rim_plate_truth(RIM_PLATES[name], h=0.15)


@lru_cache(maxsize=None)
def _rendered(name):
    return render_rim_plate(RIM_PLATES[name])


def _arrays(name, storage):
    r = _rendered(name)
    cart, bone, sp = r.cartilage, r.bone, np.asarray(r.spacing)
    if storage == "restored":  # the same voxels, axes permuted and flipped
        cart = np.flip(cart.transpose(2, 0, 1), (0, 2))
        bone = np.flip(bone.transpose(2, 0, 1), (0, 2))
        sp = sp[[2, 0, 1]]
    return cart, bone, sp


def _stats(s):
    ok = s.covered & np.isfinite(s.thickness_mm)
    t, w = s.thickness_mm[ok], s.vertex_area_mm2[ok]
    order = np.argsort(t)
    cw = np.cumsum(w[order])
    return float(np.average(t, weights=w)), float(t[order][np.searchsorted(cw, 0.5 * cw[-1])])


@pytest.mark.parametrize("storage", ["as_rendered", "restored"])
@pytest.mark.parametrize("name", sorted(RIM_PLATES))
def test_mean_and_median_over_cab_match_truth(name, storage):
    truth = _truth(name)
    s = plate_surface(*_arrays(name, storage))
    mean, median = _stats(s)
    assert abs(mean / truth["nearest_mean_mm"] - 1) < 0.03, (mean, truth)
    assert abs(median / truth["nearest_median_mm"] - 1) < 0.02, (median, truth)
    assert abs(s.covered_area_mm2 / truth["covered_area_mm2"] - 1) < 0.04


@pytest.mark.parametrize("name", sorted(RIM_PLATES))
def test_normal_ray_method_matches_its_truth(name):
    truth = _truth(name)
    mean, median = _stats(plate_surface(*_arrays(name, "as_rendered"), method="normal"))
    assert abs(mean / truth["normal_mean_mm"] - 1) < 0.03, (mean, truth)
    assert abs(median / truth["normal_median_mm"] - 1) < 0.02, (median, truth)


def test_side_walls_are_not_articular():
    """With every free surface taken as AC (angle limit 90 deg, walls included) the blunt
    plate's mean drops: the rim's nearest points end on the wall.  The default rule must not."""
    cart, bone, sp = _arrays("flat_blunt", "as_rendered")
    truth = _truth("flat_blunt")["nearest_mean_mm"]
    with_walls, _ = _stats(plate_surface(cart, bone, sp, articular_max_angle_deg=90.0))
    assert with_walls < 0.97 * truth  # the old definition's bias is visible here ...
    default, _ = _stats(plate_surface(cart, bone, sp))
    assert abs(default / truth - 1) < 0.03  # ... and gone by definition


def test_rim_exclusion_drops_only_the_outer_band():
    cart, bone, sp = _arrays("flat_tapered", "as_rendered")
    full = plate_surface(cart, bone, sp)
    inner = plate_surface(cart, bone, sp, rim_exclusion_mm=1.0)
    assert inner.covered_area_mm2 == pytest.approx(full.covered_area_mm2)
    dropped = np.isfinite(full.thickness_mm) & ~np.isfinite(inner.thickness_mm)
    # a band about 1 mm wide along the ~95 mm perimeter of the footprint
    band = full.vertex_area_mm2[dropped].sum()
    assert 0.6 * 95 < band < 1.4 * 95
    assert _stats(inner)[0] > _stats(full)[0]  # the thin outer taper is what was left out


@pytest.mark.parametrize("text, key", [
    ("thickness:\n  thickness_method: raycast\n", "thickness.thickness_method"),
    ("thickness:\n  rim_exclusion_mm: 5\n", "thickness.rim_exclusion_mm"),
    ("thickness:\n  articular_max_angle_deg: 120\n", "thickness.articular_max_angle_deg"),
])
def test_bad_thickness_config_is_one_line_exit_2(tmp_path, text, key):
    from cartiq.io.volume import Geometry, write_volume

    lab, sp = mini_knee()
    g = Geometry(shape=lab.shape, spacing=sp, origin=(0.0, 0.0, 0.0),
                 direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    write_volume(tmp_path / "seg.nii.gz", lab, g)
    write_volume(tmp_path / "image.nii.gz", lab.astype(np.float32), g)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    res = _cartiq("measure", tmp_path / "image.nii.gz", "--seg", tmp_path / "seg.nii.gz",
                  "-o", tmp_path / "o", "--config", cfg)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.yaml" in lines[0] and key in lines[0], res.stderr
