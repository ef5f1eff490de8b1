"""Single cartilage plates with blunt or tapered rims, on oblique anisotropic grids, with truth.

Two plate shapes, in a local frame (mm) where the bone lies below the plate:

* ``flat`` (tibia-like): bone ``w < 0``; cartilage ``0 <= w < t(u, v)`` on the elliptic
  footprint ``(u/a)^2 + (v/b)^2 < 1``.
* ``condyle`` (femur-like): bone cylinder of radius R along x with its lowest line at
  z = 0 (axis at z = R); cartilage ``R <= rho < R + t(x, phi)`` for ``x0 <= x <= x1``,
  ``|phi| <= arc`` (phi around the axis from straight down).  The bone reaches
  ``margin_mm`` beyond the cartilage at the side faces; at the arc ends it continues.

Rim profiles of the local thickness ``t`` (``T`` = nominal thickness):

* ``blunt``: ``t = T`` at the footprint edge, where the plate ends in a wall.
* ``tapered``: ``t`` falls linearly from ``T`` to ``rim_fraction * T`` over the outermost
  ``taper_mm`` (distance from the edge: the x and arc-length distance on the condyle; on the
  flat plate ``(1 - s) min(a, b)`` with ``s`` the elliptic scale), then a short wall.

Inside the rim (or the taper) both thicken smoothly by ``dome_fraction`` over ``dome_mm``, so
that the truth has no point mass at one value (its median is then well defined under noise).

Truth (from the geometry, never from the code under test), over the covered bone area cAB =
the footprint, area-weighted: ``nearest`` - the 3D distance from each interface point to the
nearest point of the articular surface AC (the plate's outer surface ``w = t`` or
``rho = R + t``; the rim wall is not AC), sampled at step ``h``; ``normal`` - the length along
the bone normal to that surface, which is ``t`` itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["RimPlate", "RenderedPlate", "render_rim_plate", "rim_plate_truth", "RIM_PLATES"]


@dataclass(frozen=True)
class RimPlate:
    shape: str  # "flat" | "condyle"
    rim: str  # "blunt" | "tapered"
    thickness_mm: float = 2.0
    taper_mm: float = 2.5
    rim_fraction: float = 0.25
    semi_axes_mm: tuple[float, float] = (13.0, 17.0)  # flat
    radius_mm: float = 20.0  # condyle
    x_range_mm: tuple[float, float] = (0.0, 25.0)  # condyle
    arc_deg: float = 60.0  # condyle, each side of straight down
    margin_mm: float = 4.0  # bone beyond the cartilage
    dome_fraction: float = 0.25  # inside the rim the plate thickens by this fraction of T ...
    dome_mm: float = 8.0  # ... over this distance (a smooth profile, as in real plates)

    def local_thickness(self, d_edge: np.ndarray) -> np.ndarray:
        """Thickness at distance ``d_edge`` (mm, >= 0) inside the footprint edge."""
        T = self.thickness_mm
        d = np.asarray(d_edge, dtype=float)
        start = self.taper_mm if self.rim == "tapered" else 0.0
        dome = 1.0 + self.dome_fraction * np.clip((d - start) / self.dome_mm, 0.0, 1.0)
        if self.rim == "blunt":
            return T * dome
        frac = np.clip(d / self.taper_mm, 0.0, 1.0)
        return T * (self.rim_fraction + (1.0 - self.rim_fraction) * frac) * dome


RIM_PLATES = {f"{shape}_{rim}": RimPlate(shape, rim, thickness_mm=t)
              for shape, t in (("flat", 2.4), ("condyle", 2.2)) for rim in ("blunt", "tapered")}


@dataclass
class RenderedPlate:
    cartilage: np.ndarray  # bool (ni, nj, nk)
    bone: np.ndarray  # bool
    spacing: tuple[float, float, float]
    rotation: np.ndarray  # grid axes in the local frame (columns)
    origin: np.ndarray  # grid-frame mm of voxel (0, 0, 0)

    def to_local(self, points_mm: np.ndarray) -> np.ndarray:
        """Grid-aligned mm (``index * spacing``) to the plate's local frame."""
        return (np.asarray(points_mm) + self.origin) @ self.rotation.T


def _flat_edge_distance(p: RimPlate, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = p.semi_axes_mm
    s = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return s < 1.0, (1.0 - s) * min(a, b)


def _condyle_edge_distance(p: RimPlate, x: np.ndarray, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x0, x1 = p.x_range_mm
    arc = math.radians(p.arc_deg)
    inside = (x >= x0) & (x <= x1) & (np.abs(phi) <= arc)
    d = np.minimum(np.minimum(x - x0, x1 - x), p.radius_mm * (arc - np.abs(phi)))
    return inside, d


def _labels_local(p: RimPlate, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cartilage, bone) of local-frame points q (..., 3)."""
    x, y, z = q[..., 0], q[..., 1], q[..., 2]
    m = p.margin_mm
    if p.shape == "flat":
        a, b = p.semi_axes_mm
        foot, d = _flat_edge_distance(p, x, y)
        cart = foot & (z >= 0) & (z < p.local_thickness(np.maximum(d, 0.0)))
        bone = (z < 0) & (np.abs(x) < a + m) & (np.abs(y) < b + m)
        return cart, bone
    R = p.radius_mm
    dz = z - R
    rho = np.hypot(y, dz)
    phi = np.arctan2(y, -dz)
    x0, x1 = p.x_range_mm
    bone = (rho < R) & (x >= x0 - m) & (x <= x1 + m)
    foot, d = _condyle_edge_distance(p, x, phi)
    cart = foot & (rho >= R) & (rho < R + p.local_thickness(np.maximum(d, 0.0)))
    return cart, bone


def _extent(p: RimPlate) -> tuple[np.ndarray, np.ndarray]:
    """Local-frame box holding the plate and some bone under it."""
    m, T = p.margin_mm, p.thickness_mm
    if p.shape == "flat":
        a, b = p.semi_axes_mm
        return np.array([-a - m, -b - m, -m]), np.array([a + m, b + m, T + m])
    R = p.radius_mm
    x0, x1 = p.x_range_mm
    half = (R + T + m) * math.sin(min(math.radians(p.arc_deg) + m / R, math.pi / 2))
    top = R - (R + T + m) * math.cos(min(math.radians(p.arc_deg) + m / R, math.pi / 2)) + m
    return np.array([x0 - m, -half, -T - m]), np.array([x1 + m, half, max(top, m)])


def _rotation(deg: tuple[float, float, float]) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("zyx", deg, degrees=True).as_matrix()


def render_rim_plate(p: RimPlate, spacing: tuple[float, float, float] = (0.4, 0.4, 0.8),
                     rotation_deg: tuple[float, float, float] = (17.0, 11.0, 23.0),
                     offset_vox: tuple[float, float, float] = (0.31, 0.17, 0.43)) -> RenderedPlate:
    """Label the plate at the voxel centres of a grid whose axes are rotated by
    ``rotation_deg`` (z, y, x Euler) in the local frame; ``offset_vox`` shifts the grid by a
    fraction of a voxel so that no face coincides with a row of voxel centres."""
    sp = np.asarray(spacing, float)
    rot = _rotation(rotation_deg)
    lo, hi = _extent(p)
    corners = np.array([[lo[0], lo[1], lo[2]], [hi[0], lo[1], lo[2]], [lo[0], hi[1], lo[2]],
                        [lo[0], lo[1], hi[2]], [hi[0], hi[1], lo[2]], [hi[0], lo[1], hi[2]],
                        [lo[0], hi[1], hi[2]], [hi[0], hi[1], hi[2]]])
    g = corners @ rot  # grid-frame coordinates of the corners
    g_lo = g.min(axis=0) - np.asarray(offset_vox) * sp
    shape = np.ceil((g.max(axis=0) - g_lo) / sp).astype(int) + 1
    axes = [g_lo[k] + np.arange(shape[k]) * sp[k] for k in range(3)]
    G = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    cart, bone = _labels_local(p, G @ rot.T)
    return RenderedPlate(cartilage=cart, bone=bone & ~cart, spacing=tuple(sp), rotation=rot,
                         origin=g_lo)


def _grid(lo: float, hi: float, h: float) -> np.ndarray:
    n = max(1, int(math.ceil((hi - lo) / h)))
    return lo + (np.arange(n) + 0.5) * (hi - lo) / n


def _edges(lo: float, hi: float, h: float) -> np.ndarray:
    return np.linspace(lo, hi, max(1, int(math.ceil((hi - lo) / h))) + 1)


def rim_plate_truth(p: RimPlate, h: float = 0.05) -> dict[str, float]:
    """Area-weighted truth over cAB: mean and median of both thickness definitions, and cAB."""
    from scipy.spatial import cKDTree

    T = p.thickness_mm
    if p.shape == "flat":
        a, b = p.semi_axes_mm
        U, V = np.meshgrid(_grid(-a, a, h), _grid(-b, b, h), indexing="ij")
        foot, d = _flat_edge_distance(p, U.ravel(), V.ravel())
        iface = np.stack([U.ravel()[foot], V.ravel()[foot], np.zeros(foot.sum())], 1)
        t_normal = p.local_thickness(d[foot])
        Ue, Ve = np.meshgrid(_edges(-a, a, h), _edges(-b, b, h), indexing="ij")
        fe, de = _flat_edge_distance(p, Ue.ravel(), Ve.ravel())
        ac = np.stack([Ue.ravel()[fe], Ve.ravel()[fe], p.local_thickness(de[fe])], 1)
        weights = np.ones(len(iface))
        cab = math.pi * a * b
    else:
        R = p.radius_mm
        x0, x1 = p.x_range_mm
        arc = math.radians(p.arc_deg)
        X, P = np.meshgrid(_grid(x0, x1, h), _grid(-arc, arc, h / R), indexing="ij")
        X, P = X.ravel(), P.ravel()
        _, d = _condyle_edge_distance(p, X, P)
        iface = np.stack([X, R * np.sin(P), R - R * np.cos(P)], 1)
        t_normal = p.local_thickness(d)
        Xe, Pe = np.meshgrid(_edges(x0, x1, h), _edges(-arc, arc, h / (R + T)), indexing="ij")
        _, de = _condyle_edge_distance(p, Xe.ravel(), Pe.ravel())
        r = R + p.local_thickness(de)
        ac = np.stack([Xe.ravel(), r * np.sin(Pe.ravel()), R - r * np.cos(Pe.ravel())], 1)
        weights = np.ones(len(iface))
        cab = (x1 - x0) * 2 * arc * R
    # the point straight above is on AC, so it bounds the nearest distance
    dist, _ = cKDTree(ac).query(iface, workers=-1,
                                distance_upper_bound=float(t_normal.max()) + 1e-9)
    near = np.minimum(t_normal, dist)
    return {"nearest_mean_mm": float(np.average(near, weights=weights)),
            "nearest_median_mm": float(np.median(near)),
            "normal_mean_mm": float(np.average(t_normal, weights=weights)),
            "normal_median_mm": float(np.median(t_normal)),
            "covered_area_mm2": float(cab), "nominal_mm": float(T)}
