"""Wirth-Eckstein subregions on a right knee and on the mirrored left knee (issue 13, item 6).

Truth is the region definition (``cartiq.measurement.regions``, Wirth & Eckstein 2008)
applied to the phantom's analytic plate shapes (``cartiq.data.phantom_truth``), in closed
form - not computed by the code under test:

* tibia: each plate's bone interface is an ellipse (semi-axes a = 13 mm along x, b = 17 mm
  along y).  Its second-moment ellipse is similar to it, so the central region (20% of the
  area) is the concentric ellipse of scale sqrt(0.2); the diagonals |dx| = |dy| cut the rest
  at the elliptic angle atan(a / b): external and internal hold 0.8 atan(a/b) / pi each,
  anterior and posterior 0.4 minus that;
* femur: each condyle's interface is the cylinder rho = R (20 mm), x in [8, 33] mm, uniform
  in the angle phi from straight down over [-100, 100] degrees (y = R sin phi).  The
  anterior/posterior cuts are the 1st/99th percentiles of the tibial cartilage's y, which
  for an elliptic slab are b * t with 1/2 + (t sqrt(1 - t^2) + asin t) / pi = 0.01 / 0.99;
  central thirds split |x| in [8, 33] into equal parts.

Area fractions alone do not see a swap (the phantom is symmetric: e/i, a/p and the two
condyles have equal areas), so each region's area-weighted centroid is also checked in the
phantom's right-knee model frame (the left knee mirrored back): medial regions at +x,
external tibial sectors away from the knee centre, anterior ones at -y.  The same
expectations hold for both sides; a medial/lateral or anterior/posterior swap on either side
fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq

from cartiq.data.phantom import PhantomSpec, make_phantom, world_to_model
from cartiq.measurement.measure import measure_labels

A, B = 13.0, 17.0  # tibial plate semi-axes (x, y), the PhantomSpec default
R, ARC = 20.0, 100.0  # femoral condyle radius (mm), cartilage arc (deg either side)
TOL = 0.02  # absolute tolerance on an area fraction (voxel steps at the region borders)


def _spec(side: str) -> PhantomSpec:
    return PhantomSpec(seed=11, side=side, spacing_mm=(0.5, 0.5, 0.9), full_defect_radius_mm=0.0,
                       partial_defect_radius_mm=0.0, femur_bml_radii_mm=None,
                       tibia_bml_radii_mm=None, tibial_plate_semi_axes_mm=(A, B),
                       femur_radius_mm=R, femoral_arc_deg=ARC)


def _tibia_expected(letter: str) -> dict[str, float]:
    e = 0.8 * math.atan(A / B) / math.pi
    return {f"c{letter}T": 0.2, f"e{letter}T": e, f"i{letter}T": e,
            f"a{letter}T": 0.4 - e, f"p{letter}T": 0.4 - e}


def _femur_expected() -> dict[str, float]:
    def cdf(t):  # area fraction of an ellipse below y = b t
        return 0.5 + (t * math.sqrt(1 - t * t) + math.asin(t)) / math.pi

    t_ant = brentq(lambda t: cdf(t) - 0.01, -1.0, 0.0)
    phi_a = math.degrees(math.asin(B * t_ant / R))  # anterior cut (negative angle)
    phi_p = -phi_a
    full = 2 * ARC
    out = {"TrF": (phi_a + ARC) / full}
    for c in "ML":
        central = (phi_p - phi_a) / full / 2
        out[f"p{c}F"] = (ARC - phi_p) / full / 2
        out[f"c{c}F"] = central
        for part in ("ec", "cc", "ic"):
            out[f"{part}{c}F"] = central / 3
    return out


@pytest.fixture(scope="module", params=["right", "left"])
def knee(request):
    spec = _spec(request.param)
    ph = make_phantom(spec)
    res = measure_labels(ph.labels.array, ph.labels.geometry, side=spec.side)
    return spec, res


def _fractions(plate) -> dict[str, float]:
    w = plate.vertex_area_mm2
    codes = plate.region.astype(str)
    total = w[codes != ""].sum()
    out = {c: float(w[codes == c].sum() / total) for c in set(codes) - {""}}
    for c in ("M", "L"):  # the parent of the central thirds
        out[f"c{c}F"] = sum(out.get(f"{p}c{c}F", 0.0) for p in "eci")
    return out


def _centroids(spec, plate) -> dict[str, np.ndarray]:
    model = world_to_model(spec, plate.points_world)
    codes = plate.region.astype(str)
    w = plate.vertex_area_mm2
    return {c: (model[codes == c] * w[codes == c, None]).sum(0) / w[codes == c].sum()
            for c in set(codes) - {""}}


@pytest.mark.parametrize("plate,letter", [("medial_tibial_cartilage", "M"),
                                          ("lateral_tibial_cartilage", "L")])
def test_tibial_subregion_area_fractions(knee, plate, letter):
    _, res = knee
    got = _fractions(res.plates[plate])
    for code, want in _tibia_expected(letter).items():
        assert got.get(code, 0.0) == pytest.approx(want, abs=TOL), (code, got)


def test_femoral_subregion_area_fractions(knee):
    _, res = knee
    got = _fractions(res.plates["femoral_cartilage"])
    for code, want in _femur_expected().items():
        assert got.get(code, 0.0) == pytest.approx(want, abs=TOL), (code, got)


def test_subregions_sit_where_the_definition_puts_them(knee):
    """Model frame of a right knee (left knees mirrored back): +x medial, +y posterior."""
    spec, res = knee
    tib = {letter: _centroids(spec, res.plates[p]) for letter, p in
           (("M", "medial_tibial_cartilage"), ("L", "lateral_tibial_cartilage"))}
    for letter, medial_sign in (("M", 1.0), ("L", -1.0)):
        c = tib[letter]
        centre = c[f"c{letter}T"]
        assert medial_sign * centre[0] > 5.0  # the plate is in its own compartment
        # external = away from the knee centre, i.e. toward this compartment's side
        assert medial_sign * (c[f"e{letter}T"][0] - centre[0]) > 3.0
        assert medial_sign * (c[f"i{letter}T"][0] - centre[0]) < -3.0
        assert c[f"a{letter}T"][1] < centre[1] - 3.0  # anterior = -y
        assert c[f"p{letter}T"][1] > centre[1] + 3.0
    fem = _centroids(spec, res.plates["femoral_cartilage"])
    assert fem["TrF"][1] < -10.0
    for letter, medial_sign in (("M", 1.0), ("L", -1.0)):
        assert fem[f"p{letter}F"][1] > 10.0
        assert medial_sign * fem[f"p{letter}F"][0] > 8.0
        ext, cen, inn = (medial_sign * fem[f"{p}c{letter}F"][0] for p in "eci")
        assert 8.0 < inn < cen < ext < 33.0
