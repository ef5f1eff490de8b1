"""Measured quantities behind the MOCART-like items, from columns cast through a repair site.

Method
------
Around each site a local frame is set up: origin ``c`` near the site's centroid, ``n`` the
normal of the subchondral bone surface (pointing from the bone into the plate's cartilage)
and ``e1``, ``e2`` spanning the tangent plane.  A square grid of columns ``grid_mm`` apart
covers a disc of radius ``R`` in the tangent plane; along each column the label indicators
and the image are sampled every ``step_mm`` from ``bone_depth_mm`` below to
``max_height_mm`` above ``c`` (trilinear interpolation for the masks and the image, nearest
neighbour for site masks and lesion components).  All sampling happens at world (LPS mm)
positions, so the results do not depend on how a file orders or flips its axes.

Per column (heights along ``n``, in mm):

* ``b`` bone surface: the topmost 0.5 crossing of the bone indicator (bone or BML label);
* ``t`` cartilage thickness: integral of the plate's cartilage indicator above
  ``b - bone_margin``; ``tc = t * cos(theta)`` where ``theta`` is the tilt of the fitted bone
  surface against ``n`` (corrects oblique columns on curved plates);
* ``a`` articular surface: the topmost 0.5 crossing of the cartilage indicator.

The site footprint is the set of columns that meet the site mask (closed and hole-filled in
the tangent plane); the native reference ring is the columns ``ring_gap_mm`` to
``ring_gap_mm + ring_width_mm`` outside the footprint that carry cartilage of the same plate.
Every function here is pure: arrays in, numbers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage


NAN = float("nan")

__all__ = ["LocalFrame", "Columns", "make_frame", "sample_columns", "column_profiles", "quad_fit",
           "feret_diameter_mm", "robust_sd", "cells_mm"]


@dataclass(frozen=True)
class LocalFrame:
    """Origin (LPS mm) and orthonormal axes of a site's tangent frame."""

    center: np.ndarray
    normal: np.ndarray
    e1: np.ndarray
    e2: np.ndarray


def make_frame(center: np.ndarray, normal: np.ndarray) -> LocalFrame:
    """Tangent frame from a normal; ``e1`` is chosen deterministically from world axes."""
    n = np.asarray(normal, float)
    n = n / np.linalg.norm(n)
    helper = np.eye(3)[int(np.argmin(np.abs(n)))]
    e1 = np.cross(n, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(n, e1)
    return LocalFrame(np.asarray(center, float), n, e1, e2)


@dataclass
class Columns:
    """Samples on a grid of columns: 2D grid shape ``(m, m)``, ``k`` samples per column."""

    frame: LocalFrame
    grid_mm: float
    step_mm: float
    u: np.ndarray            # (m, m) tangent coordinate along e1, mm
    v: np.ndarray            # (m, m) along e2, mm
    w: np.ndarray            # (k,) height along n, mm
    inside: np.ndarray       # (m, m) bool: within the disc of radius R
    samples: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (m, m, k)


def sample_columns(frame: LocalFrame, radius_mm: float, w_range_mm: tuple[float, float],
                   grid_mm: float, step_mm: float,
                   world_to_index: Callable[[np.ndarray], np.ndarray],
                   shape: tuple[int, int, int],
                   arrays: dict[str, tuple[Callable[[tuple[slice, ...]], np.ndarray], int]]
                   ) -> Columns:
    """Sample volumes along the columns of a tangent grid.

    Parameters
    ----------
    frame : the site's local frame.
    radius_mm : radius of the disc of columns.
    w_range_mm : (low, high) heights along the normal, mm.
    grid_mm, step_mm : column spacing and sample step, mm.
    world_to_index : maps (N, 3) LPS mm to continuous voxel indices.
    shape : the volume shape (indices outside read as 0).
    arrays : name -> (crop function returning the array for a tuple of slices, spline order).
        Taking a crop function lets callers build float indicators only for the crop.
    """
    m = 2 * int(math.ceil(radius_mm / grid_mm)) + 1
    ax = (np.arange(m) - m // 2) * grid_mm
    u, v = np.meshgrid(ax, ax, indexing="ij")
    w = np.arange(w_range_mm[0], w_range_mm[1] + 0.5 * step_mm, step_mm)
    pts = (frame.center[None, None, None, :] + u[..., None, None] * frame.e1
           + v[..., None, None] * frame.e2 + w[None, None, :, None] * frame.normal)
    idx = world_to_index(pts.reshape(-1, 3))
    lo = np.clip(np.floor(idx.min(0)).astype(int) - 1, 0, np.asarray(shape) - 1)
    hi = np.clip(np.ceil(idx.max(0)).astype(int) + 2, 1, np.asarray(shape))
    cols = Columns(frame, grid_mm, step_mm, u, v, w, (u ** 2 + v ** 2) <= radius_mm ** 2)
    if np.any(hi <= lo):
        for name in arrays:
            cols.samples[name] = np.zeros((m, m, w.size), np.float32)
        return cols
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    local = (idx - lo).T
    for name, (getter, order) in arrays.items():
        sub = getter(crop)
        vals = ndimage.map_coordinates(sub, local, order=order, mode="constant", cval=0.0,
                                       prefilter=False)
        cols.samples[name] = vals.reshape(m, m, w.size).astype(np.float32)
    return cols


def _top_crossing(frac: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Height of the topmost 0.5 crossing of an indicator along each column (NaN: none)."""
    above = frac >= 0.5
    anyv = above.any(-1)
    k = frac.shape[-1]
    top = k - 1 - np.argmax(above[..., ::-1], axis=-1)
    out = np.full(frac.shape[:-1], np.nan)
    step = w[1] - w[0] if w.size > 1 else 1.0
    ii = np.nonzero(anyv)
    t = top[ii]
    f0 = frac[ii + (t,)]
    nxt = np.minimum(t + 1, k - 1)
    f1 = np.where(t + 1 < k, frac[ii + (nxt,)], 0.0)
    denom = np.where(np.abs(f0 - f1) > 1e-6, f0 - f1, 1.0)
    frac_step = np.clip((f0 - 0.5) / denom, 0.0, 1.0)
    out[ii] = w[t] + frac_step * step
    return out


def column_profiles(cols: Columns, *, bone_margin_mm: float, max_cart_height_mm: float
                    ) -> dict[str, np.ndarray]:
    """Bone surface ``b``, cartilage thickness ``t`` and articular surface ``a`` per column."""
    w = cols.w
    b = _top_crossing(cols.samples["bone"], w)
    b[~cols.inside] = np.nan
    lo = np.where(np.isnan(b), np.inf, b - bone_margin_mm)
    hi = np.where(np.isnan(b), -np.inf, b + max_cart_height_mm)
    band = (w[None, None, :] >= lo[..., None]) & (w[None, None, :] <= hi[..., None])
    cart = cols.samples["cart"] * band
    t = cart.sum(-1) * cols.step_mm
    t[np.isnan(b)] = np.nan
    a = _top_crossing(cart, w)
    # internal gap: non-cartilage run between the bone surface and the articular surface
    solid = (cart >= 0.5) & (w[None, None, :] >= (b + 0.5 * cols.step_mm)[..., None])
    below_a = w[None, None, :] <= np.nan_to_num(a, nan=-np.inf)[..., None]
    gap = (~solid) & below_a & (w[None, None, :] > b[..., None])
    gap_mm = gap.sum(-1) * cols.step_mm
    return {"b": b, "t": t, "a": a, "gap_mm": gap_mm.astype(float)}


def quad_fit(u: np.ndarray, v: np.ndarray, z: np.ndarray, *, trim_mm: float = 0.5,
             iterations: int = 3
            ) -> tuple[np.ndarray, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """Robust least-squares quadratic surface ``z(u, v)``; returns (coefficients, predictor).

    Points farther than ``max(trim_mm, 3 * robust SD)`` from the fit are dropped and the fit
    repeated.  Falls back to a plane (< 12 points) or a constant (< 4 points).
    """
    u, v, z = (np.asarray(x, float).ravel() for x in (u, v, z))
    ok = np.isfinite(z)
    n = int(ok.sum())
    if n == 0:
        return np.zeros(6), lambda uu, vv: np.full(np.shape(uu), np.nan)
    ncoef = 6 if n >= 12 else (3 if n >= 4 else 1)

    def design(uu: np.ndarray, vv: np.ndarray) -> np.ndarray:
        cols = [np.ones_like(uu), uu, vv, uu * uu, uu * vv, vv * vv]
        return np.stack(cols[:ncoef], -1)

    keep = ok.copy()
    coef = np.zeros(ncoef)
    for _ in range(iterations):
        coef, *_ = np.linalg.lstsq(design(u[keep], v[keep]), z[keep], rcond=None)
        res = z - design(u, v) @ coef
        mad = 1.4826 * np.median(np.abs(res[keep]))
        new = ok & (np.abs(res) <= max(trim_mm, 3 * mad))
        if new.sum() < ncoef or np.array_equal(new, keep):
            break
        keep = new
    full = np.zeros(6)
    full[:ncoef] = coef

    def predict(uu: np.ndarray, vv: np.ndarray) -> np.ndarray:
        uu = np.asarray(uu, float)
        vv = np.asarray(vv, float)
        return (full[0] + full[1] * uu + full[2] * vv + full[3] * uu * uu + full[4] * uu * vv
                + full[5] * vv * vv)

    return full, predict


def feret_diameter_mm(points: np.ndarray, extent_mm: float = 0.0) -> float:
    """Largest distance between points (N, d) in mm, plus ``extent_mm`` (a cell or voxel size)."""
    pts = np.asarray(points, float)
    if len(pts) == 0:
        return 0.0
    if len(pts) == 1:
        return float(extent_mm)
    if len(pts) > 400:
        from scipy.spatial import ConvexHull, QhullError

        try:
            pts = pts[ConvexHull(pts).vertices]
        except (QhullError, ValueError):
            pass
    if len(pts) > 3000:
        pts = pts[:: int(math.ceil(len(pts) / 3000))]
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
    return float(d.max()) + float(extent_mm)


def robust_sd(x: np.ndarray) -> float:
    if x.size < 2:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def cells_mm(cols: Columns, mask: np.ndarray) -> np.ndarray:
    return np.stack([cols.u[mask], cols.v[mask]], -1)
