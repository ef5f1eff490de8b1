"""Continuous knee model of the phantom: implicit label functions and analytic ground truth.

All coordinates here are in the *knee frame* of a RIGHT knee, in mm, LPS axes
(x patient Left = medial for a right knee, y Posterior, z Superior); the joint centre is
the origin.  :mod:`cartiq.data.phantom` maps a voxel's world position into this frame (rigid
motion, mirroring for a left knee) before calling :meth:`KneeModel.labels_at`.

Geometry (defaults in brackets, see :class:`cartiq.data.phantom.PhantomSpec`)
--------------------------------------------------------------------------
* Femur: two condyles, horizontal cylinders along x (axis y = 0, z = ``z_c`` = R, radius
  R [20]); medial x in [8 - m, 33 + m], lateral x in [-33 - m, -8 + m] (bone margin m [1.5]);
  a shaft box (|x| <= 33 + m, |y| <= 0.7 R, z >= z_c) joins them, so the femur is one bone
  whose lowest point is z = 0.
* Femoral cartilage: cylindrical shell R <= rho < R + T_f on both condyles (|x| in [8, 33])
  over the sector
  |phi| <= arc [100 deg], phi measured around the condyle axis from straight down, positive
  posterior.  Full-thickness defect: the points with (x - x0)^2 + (R (phi - phi0))^2 < r^2
  (unrolled bone-surface coordinates) carry no cartilage at any radius; its bone area is
  exactly pi r^2.
* Tibia: elliptic cylinder below the flat plateau z = z_t (one height for both plates),
  z_t = -(T_f + gap + max(T_mt, T_lt)).  Tibial cartilage: flat slabs z_t <= z < z_t + T with
  elliptic footprints centred under each condyle.  Partial defect: in a disk of the lateral
  plate the thickness is (1 - depth) T.
* Menisci: wedge rings on the plateau outside each footprint (elliptic scale 1 <= s < 1.35),
  height rising linearly from the plate thickness to ``meniscus_height_mm``.
* Patella: elliptic prism anterior to the femur (footprint 1.5 mm wider than its cartilage),
  its cartilage a slab of thickness T_p on its posterior face, separated from the femoral
  cartilage by ``patellar_gap_mm``.
* BMLs: ellipsoids (axes along x, y, z) inside the medial femoral condyle and medial tibia.

Truth thickness follows the measurement's definition (tAB to AC, Eckstein/Wirth): for each
point of the covered bone-cartilage interface, the 3D distance to the nearest point of the
plate's articular surface AC - the joint-facing faces only: the top face of a slab, the outer
cylinder of the condyle shell, and the floor of the partial defect; side faces, end faces and
defect walls are not AC.  Where the nearest AC point is not the one straight above (near the
partial defect) the floor is sampled densely (step ``h`` mm) and searched with a k-d tree.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from cartiq.io.labels import default_scheme

__all__ = ["KneeModel", "plate_truth", "slab_thickness_samples", "meniscus_volumes"]

log = logging.getLogger(__name__)

SHAFT_HALF_Y = 0.7  # x R
MENISCUS_OUTER_SCALE = 1.35
TIBIA_SEMI_AXES_MM = (42.0, 28.0)
PATELLA_BONE_MM = 14.0


@dataclass(frozen=True)
class KneeModel:
    """Derived continuous geometry of a right knee (all mm).

    Built from a :class:`cartiq.data.phantom.PhantomSpec` by :func:`cartiq.data.phantom.knee_model`,
    which holds the defaults; the two constants below are not part of the spec.
    """

    R: float
    condyle_x: tuple[float, float]
    arc_deg: float
    T_f: float
    T_mt: float
    T_lt: float
    T_p: float
    gap: float
    patellar_gap: float
    plate_axes: tuple[float, float]
    patella_axes: tuple[float, float]
    bone_margin: float  # condyle and patella bone extend this far beyond the cartilage
    meniscus_height: float
    menisci: bool
    full_r: float
    full_centre: tuple[float, float]  # (x0 mm, phi0 deg) on the medial condyle
    partial_r: float
    partial_depth: float
    partial_centre: tuple[float, float]  # (x, y) on the lateral plate
    femur_bml: tuple[float, float, float] | None
    femur_bml_centre: tuple[float, float, float]
    tibia_bml: tuple[float, float, float] | None
    patella_z: float = 32.0
    tibia_bml_depth: float = 2.5  # mm from the plateau to the top of the tibial BML

    # ------------------------------------------------------------------ derived
    @property
    def z_c(self) -> float:
        return self.R

    @property
    def z_t(self) -> float:
        return -(self.T_f + self.gap + max(self.T_mt, self.T_lt))

    @property
    def plate_x(self) -> float:
        return 0.5 * (self.condyle_x[0] + self.condyle_x[1])

    @property
    def patella_y(self) -> float:
        """y of the patellar articular surface (posterior face of its cartilage)."""
        return -(self.R + self.T_f + self.patellar_gap)

    @property
    def tibia_bml_centre(self) -> tuple[float, float, float]:
        c = self.tibia_bml or (0.0, 0.0, 0.0)
        return (self.plate_x, -3.0, self.z_t - self.tibia_bml_depth - c[2])

    # ------------------------------------------------------------------ implicit model
    def labels_at(self, p: np.ndarray) -> np.ndarray:
        """Label (cartiq scheme, uint8) of each knee-frame point ``p`` (N, 3) mm.

        Each structure is evaluated only on the points inside its bounding box (speed).
        """
        s = default_scheme()
        out = np.zeros(len(p), dtype=np.uint8)
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        x0, x1 = self.condyle_x
        R, zc = self.R, self.z_c
        zt = self.z_t
        bone = np.zeros(len(p), dtype=bool)  # femur or tibia (for BMLs)

        # femur and femoral cartilage
        bm = self.bone_margin  # the condyle bone is this much wider than its cartilage
        idx = np.flatnonzero((np.abs(x) <= x1 + bm) & (z >= zc - R - self.T_f))
        xs, ys, zs = x[idx], y[idx], z[idx]
        ax = np.abs(xs)
        dz = zs - zc
        rho = np.hypot(ys, dz)
        femur = ((ax >= x0 - bm) & (rho < R)) | ((dz >= 0) & (np.abs(ys) <= SHAFT_HALF_Y * R))
        out[idx[femur]] = s["femur"]
        bone[idx[femur]] = True
        in_cond = (ax >= x0) & (ax <= x1)
        band = np.flatnonzero(in_cond & (rho >= R) & (rho < R + self.T_f) & ~femur)
        phi = np.arctan2(ys[band], -dz[band])
        fc = np.abs(phi) <= math.radians(self.arc_deg)
        if self.full_r > 0:
            fx, fphi = self.full_centre
            fc &= (xs[band] - fx) ** 2 + (R * (phi - math.radians(fphi))) ** 2 >= self.full_r ** 2
        out[idx[band[fc]]] = s["femoral_cartilage"]

        # tibia
        ta, tb = TIBIA_SEMI_AXES_MM
        idx = np.flatnonzero(z < zt)
        tib = (x[idx] / ta) ** 2 + (y[idx] / tb) ** 2 < 1.0
        out[idx[tib]] = s["tibia"]
        bone[idx[tib]] = True

        # tibial cartilage and menisci
        a, b = self.plate_axes
        top = max(self.T_mt, self.T_lt, self.meniscus_height if self.menisci else 0.0)
        for sign, name, men, T in ((1.0, "medial_tibial_cartilage", "medial_meniscus", self.T_mt),
                                   (-1.0, "lateral_tibial_cartilage", "lateral_meniscus",
                                    self.T_lt)):
            xc = sign * self.plate_x
            S = MENISCUS_OUTER_SCALE
            idx = np.flatnonzero((z >= zt) & (z < zt + top) & (np.abs(x - xc) < S * a)
                                 & (np.abs(y) < S * b))
            xs, ys, zs = x[idx], y[idx], z[idx]
            sc = np.sqrt(((xs - xc) / a) ** 2 + (ys / b) ** 2)
            h = np.full(len(idx), T)
            if sign < 0 and self.partial_r > 0:
                px, py = self.partial_centre
                in_d = (xs - px) ** 2 + (ys - py) ** 2 < self.partial_r ** 2
                h[in_d] = (1.0 - self.partial_depth) * T
            out[idx[(sc < 1.0) & (zs < zt + h)]] = s[name]
            if self.menisci:
                hm = T + (sc - 1.0) / (S - 1.0) * (self.meniscus_height - T)
                out[idx[(sc >= 1.0) & (sc < S) & (zs < zt + hm)]] = s[men]

        # patella and patellar cartilage
        pa, pb = self.patella_axes
        yp = self.patella_y
        idx = np.flatnonzero((y <= yp) & (y > yp - self.T_p - PATELLA_BONE_MM))
        xs, zs = x[idx], z[idx] - self.patella_z
        cart = y[idx] > yp - self.T_p
        foot = (xs / pa) ** 2 + (zs / pb) ** 2 < 1.0
        mg = self.bone_margin
        bone_foot = (xs / (pa + mg)) ** 2 + (zs / (pb + mg)) ** 2 < 1.0
        out[idx[foot & cart]] = s["patellar_cartilage"]
        out[idx[bone_foot & ~cart]] = s["patella"]

        # BMLs replace bone
        for _, radii, centre in self.lesions():
            lo, hi = np.subtract(centre, radii), np.add(centre, radii)
            idx = np.flatnonzero(np.all((p >= lo) & (p <= hi), axis=1))
            q = (p[idx] - np.asarray(centre)) / np.asarray(radii)
            inside = np.einsum("ij,ij->i", q, q) < 1.0
            out[idx[inside & bone[idx]]] = s["bone_marrow_lesion"]
        return out

    def lesions(self) -> list[tuple[str, tuple[float, float, float], tuple[float, float, float]]]:
        """(bone, semi-axes, centre) of each BML in the knee frame."""
        out = []
        if self.femur_bml is not None:
            out.append(("femur", self.femur_bml, self.femur_bml_centre))
        if self.tibia_bml is not None:
            out.append(("tibia", self.tibia_bml, self.tibia_bml_centre))
        return out

    def check(self) -> list[str]:
        """Problems with the geometry (empty when consistent)."""
        problems = []
        x0, x1 = self.condyle_x
        if not 0 < x0 < x1:
            problems.append("condyle_x_mm must satisfy 0 < inner < outer")
        if self.full_r > 0:
            fx, fphi = self.full_centre
            arc_mm = math.radians(self.arc_deg) * self.R
            if not (x0 + self.full_r < fx < x1 - self.full_r) or (
                    abs(math.radians(fphi)) * self.R + self.full_r > arc_mm):
                problems.append("full-thickness defect does not fit inside the medial "
                                "condyle plate")
        if self.partial_r > 0:
            px, py = self.partial_centre
            a, b = self.plate_axes
            t = np.linspace(0, 2 * np.pi, 361)
            ex, ey = px + self.partial_r * np.cos(t), py + self.partial_r * np.sin(t)
            if np.any(((ex + self.plate_x) / a) ** 2 + (ey / b) ** 2 >= 1.0):
                problems.append("partial defect does not fit inside the lateral tibial plate")
            if not 0 < self.partial_depth < 1:
                problems.append("partial_defect_depth_fraction must be in (0, 1)")
        for bone, radii, centre in self.lesions():
            pts = _ellipsoid_surface(radii, centre)
            lab = self.labels_at(pts)
            want = default_scheme()["bone_marrow_lesion"]
            if np.any(lab != want):  # some of its surface lies outside femur/tibia
                problems.append(f"{bone} BML does not lie entirely inside the {bone}")
        return problems


def _ellipsoid_surface(radii, centre, n: int = 24) -> np.ndarray:
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, n), np.linspace(0, np.pi, n))
    pts = np.stack([np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v)], -1).reshape(-1, 3)
    return np.asarray(centre) + 0.999 * pts * np.asarray(radii)


# ----------------------------------------------------------------------------- sampling

def _grid(lo: float, hi: float, h: float) -> np.ndarray:
    """Cell centres covering [lo, hi] with step about h."""
    n = max(1, int(math.ceil((hi - lo) / h)))
    return lo + (np.arange(n) + 0.5) * (hi - lo) / n


def _edges(lo: float, hi: float, h: float) -> np.ndarray:
    """Points covering [lo, hi] including both ends with step about h."""
    n = max(1, int(math.ceil((hi - lo) / h)))
    return np.linspace(lo, hi, n + 1)


def slab_thickness_samples(a: float, b: float, T: float, h: float,
                           hole: tuple[float, float, float, float] | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Interface points and truth thickness of a flat slab with an elliptic footprint.

    Local frame: footprint ``(u/a)^2 + (v/b)^2 < 1`` on the interface w = 0, articular
    surface w = T.  ``hole`` = (u0, v0, r, depth_fraction): inside that disk the thickness
    is ``(1 - depth) T``.  Returns interface points (N, 3) (cell centres, equal areas h^2)
    and their distance (N,) to the nearest AC point: the point straight above on the top face
    or floor (exact), or a dense sample (step h) of the defect's floor next to it.
    """
    u, v = np.meshgrid(_grid(-a, a, h), _grid(-b, b, h), indexing="ij")
    u, v = u.ravel(), v.ravel()
    keep = (u / a) ** 2 + (v / b) ** 2 < 1.0
    iface = np.stack([u[keep], v[keep], np.zeros(keep.sum())], 1)
    direct = np.full(len(iface), float(T))
    parts = []
    cand = np.zeros(len(iface), dtype=bool)
    if hole is not None:  # the floor is AC (it faces the joint); the hole's wall is not
        u0, v0, r, d = hole
        floor = (1.0 - d) * T
        direct[(iface[:, 0] - u0) ** 2 + (iface[:, 1] - v0) ** 2 < r ** 2] = floor
        fu, fv = np.meshgrid(_edges(-r, r, h), _edges(-r, r, h), indexing="ij")
        inside = fu ** 2 + fv ** 2 <= r ** 2
        parts.append(np.stack([u0 + fu[inside], v0 + fv[inside],
                               np.full(inside.sum(), floor)], 1))
        # the disk's rim, so that the floor's edge is sampled exactly
        th = np.linspace(0, 2 * np.pi, max(16, int(math.ceil(2 * np.pi * r / h))),
                         endpoint=False)
        parts.append(np.stack([u0 + r * np.cos(th), v0 + r * np.sin(th),
                               np.full(th.size, floor)], 1))
        cand = np.hypot(iface[:, 0] - u0, iface[:, 1] - v0) < r + T
    if not parts:
        return iface, direct
    return iface, _nearest(iface, np.concatenate(parts), direct, cand)


def _nearest(points: np.ndarray, boundary: np.ndarray, direct: np.ndarray,
             cand: np.ndarray) -> np.ndarray:
    """min(direct, distance to the nearest boundary sample), computed for ``cand`` points."""
    from scipy.spatial import cKDTree

    out = direct.astype(float).copy()
    if cand.any():
        dist, _ = cKDTree(boundary).query(points[cand],
                                          distance_upper_bound=float(direct.max()) + 1e-9)
        out[cand] = np.minimum(direct[cand], dist)
    return out


def _femoral_thickness_samples(m: KneeModel, h: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interface (x, phi) samples of both condyles, their truth thickness, and covered mask.

    AC is the outer cylinder rho = R + T, so a covered interface point's nearest AC point is
    the one radially outward, at distance T exactly (the side faces x = const, the end faces
    phi = +-arc and the defect wall are not AC).
    """
    R, T = m.R, m.T_f
    arc = math.radians(m.arc_deg)
    x0, x1 = m.condyle_x
    out_pts, out_d, out_cov = [], [], []
    for sign in (1.0, -1.0):
        lo, hi = sorted((sign * x0, sign * x1))
        X, P = np.meshgrid(_grid(lo, hi, h), _grid(-arc, arc, h / R), indexing="ij")
        X, P = X.ravel(), P.ravel()
        covered = np.ones(X.shape, bool)
        if sign > 0 and m.full_r > 0:
            fx, fphi = m.full_centre
            covered = (X - fx) ** 2 + (R * (P - math.radians(fphi))) ** 2 >= m.full_r ** 2
        out_pts.append(_cyl(X, P, np.full(X.shape, R), m))
        out_d.append(np.where(covered, float(T), 0.0))
        out_cov.append(covered)
    return np.concatenate(out_pts), np.concatenate(out_d), np.concatenate(out_cov)


def _cyl(x: np.ndarray, phi: np.ndarray, rho: np.ndarray, m: KneeModel) -> np.ndarray:
    return np.stack([x, rho * np.sin(phi), m.z_c - rho * np.cos(phi)], 1)


@lru_cache(maxsize=16)
def plate_truth(m: KneeModel, h: float = 0.1) -> dict[str, dict[str, float]]:
    """Analytic truth per plate (knee-frame quantities, invariant to rigid motion)."""
    out: dict[str, dict[str, float]] = {}
    R, T = m.R, m.T_f
    arc = math.radians(m.arc_deg)
    L = m.condyle_x[1] - m.condyle_x[0]
    full_area = math.pi * m.full_r ** 2 if m.full_r > 0 else 0.0
    t_ab = 2 * L * R * 2 * arc
    ring = ((R + T) ** 2 - R ** 2) / 2  # int_R^{R+T} rho d rho
    vol = 2 * L * 2 * arc * ring - ring * full_area / R  # the hole spans full_area / R of (x, phi)
    _, d, cov = _femoral_thickness_samples(m, h)
    out["femoral_cartilage"] = _plate_row(T, d[cov], t_ab, full_area, vol)
    a, b = m.plate_axes
    for name, T, hole in (("medial_tibial_cartilage", m.T_mt, None),
                          ("lateral_tibial_cartilage", m.T_lt,
                           (m.partial_centre[0] + m.plate_x, m.partial_centre[1], m.partial_r,
                            m.partial_depth) if m.partial_r > 0 else None)):
        _, d = slab_thickness_samples(a, b, T, h, hole)
        vol = math.pi * a * b * T
        if hole is not None:
            vol -= math.pi * hole[2] ** 2 * hole[3] * T
        out[name] = _plate_row(T, d, math.pi * a * b, 0.0, vol)
    pa, pb = m.patella_axes
    _, d = slab_thickness_samples(pa, pb, m.T_p, h)
    out["patellar_cartilage"] = _plate_row(m.T_p, d, math.pi * pa * pb, 0.0,
                                           math.pi * pa * pb * m.T_p)
    return out


def meniscus_volumes(m: KneeModel) -> dict[str, float]:
    """Analytic volume (mm3) of each meniscus wedge ring (0 when disabled).

    V = 2 pi a b  int_1^S s h(s) ds,  h(s) = T + (s - 1) (H - T) / (S - 1).
    """
    if not m.menisci:
        return {"medial_meniscus": 0.0, "lateral_meniscus": 0.0}
    a, b = m.plate_axes
    S, H = MENISCUS_OUTER_SCALE, m.meniscus_height
    out = {}
    for name, T in (("medial_meniscus", m.T_mt), ("lateral_meniscus", m.T_lt)):
        k = (H - T) / (S - 1.0)
        integral = T * (S ** 2 - 1) / 2 + k * ((S ** 3 - 1) / 3 - (S ** 2 - 1) / 2)
        out[name] = 2 * math.pi * a * b * integral
    return out


def _plate_row(T: float, d: np.ndarray, t_ab: float, denuded: float,
               vol: float) -> dict[str, float]:
    return {
        "nominal_thickness_mm": float(T),
        "thickness_mean_mm": float(np.mean(d)),
        "thickness_median_mm": float(np.median(d)),
        "thickness_max_mm": float(np.max(d)),
        "interface_area_mm2": float(t_ab),
        "covered_area_mm2": float(t_ab - denuded),
        "denuded_area_mm2": float(denuded),
        "volume_mm3": float(vol),
    }
