"""Repair sites for scoring: site inputs (masks, point sets, detected defects), the
bone-surface normal under a site, nearby plates, lesion diameters and footprints.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from cartiq.errors import InputError
from cartiq.io.volume import Geometry
from cartiq.io.labels import default_scheme
from cartiq.scoring.columns import Columns, feret_diameter_mm

NAN = float("nan")

__all__ = ["LazyDiameters", "plate_near", "bone_normal", "index_crop_getter",
           "footprint_from_samples", "footprint_from_points", "SiteSpec", "site_inputs",
           "sites_from_scan_result", "sites_from_defects_csv"]


class LazyDiameters:
    """Component id -> maximum diameter (mm), computed on first use."""

    def __init__(self, cc: np.ndarray, geometry: Geometry) -> None:
        self.cc, self.geometry = cc, geometry
        self.boxes = ndimage.find_objects(cc)
        self.cache: dict[int, float] = {}
        self.owners: dict[int, list[int]] = {}

    def get(self, i: int, default: float = 0.0) -> float:
        if i in self.cache:
            return self.cache[i]
        if i < 1 or i > len(self.boxes) or self.boxes[i - 1] is None:
            return default
        box = self.boxes[i - 1]
        idx = np.argwhere(self.cc[box] == i) + np.array([s.start for s in box])
        pts = self.geometry.index_to_world(idx)
        self.cache[i] = feret_diameter_mm(pts, float(np.mean(self.geometry.spacing)))
        return self.cache[i]

    def in_bone(self, labels: np.ndarray, bone_value: int) -> list[int]:
        """Components whose 1-voxel shell touches ``bone_value`` more than any other label."""
        if bone_value in self.owners:
            return self.owners[bone_value]
        out: list[int] = []
        self.owners[bone_value] = out
        for i, box in enumerate(self.boxes, start=1):
            if box is None:
                continue
            big = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
            comp = self.cc[big] == i
            shell = ndimage.binary_dilation(comp) & ~comp
            vals, counts = np.unique(labels[big][shell], return_counts=True)
            keep = vals != 0
            if keep.any() and vals[keep][np.argmax(counts[keep])] == bone_value:
                out.append(i)
        return out

    def only(self, ids: list[int]) -> dict[int, float]:
        """Diameters of the given components (a plain dict)."""
        return {i: self.get(i) for i in ids}


def plate_near(labels: np.ndarray, geom: Geometry, idx: np.ndarray, search_mm: float
               ) -> str | None:
    """The cartilage plate of a site (voxel indices ``idx``): the plate label most present
    inside the site, else the one with most voxels within ``search_mm`` of it."""
    scheme = default_scheme()
    margin = np.ceil(search_mm / np.asarray(geom.spacing)).astype(int) + 1
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, labels.shape)
    sub = labels[tuple(slice(a, b) for a, b in zip(lo, hi))]
    mask = np.zeros(sub.shape, bool)
    mask[tuple((idx - lo).T)] = True
    inside = {p: int((sub[mask] == scheme[p]).sum()) for p in scheme.plates}
    if max(inside.values()) >= 3:       # the site covers cartilage (repair tissue): its plate
        return max(inside, key=inside.get)
    near = ndimage.distance_transform_edt(~mask, sampling=geom.spacing) <= search_mm
    counts = {p: int(((sub == scheme[p]) & near).sum()) for p in scheme.plates}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else None


def bone_normal(labels: np.ndarray, geom: Geometry, c: np.ndarray, radius: float,
                bone_vals: list[int], plate_val: int, sigma_mm: float = 2.0) -> np.ndarray | None:
    """Unit normal of the bone surface near ``c`` (LPS), pointing out of the bone.

    Minus the gradient, at ``c``, of the bone indicator smoothed with a Gaussian of
    ``sigma_mm`` (central differences at world offsets, so independent of the file's axis
    order).  Far from any bone (flat field) it falls back to the direction from the bone's
    to the plate's cartilage centroid within ``radius``.
    """
    sp = np.asarray(geom.spacing)
    sigma = max(sigma_mm, 1.5 * float(sp.max()))
    ci = geom.world_to_index(c)[0]
    r = np.ceil((4 * sigma + 2.0) / sp).astype(int) + 1
    lo = np.maximum(np.floor(ci).astype(int) - r, 0)
    hi = np.minimum(np.ceil(ci).astype(int) + r + 1, labels.shape)
    if np.any(hi <= lo):
        return None
    sub = np.isin(labels[tuple(slice(a, b) for a, b in zip(lo, hi))], bone_vals)
    if sub.any():
        sm = ndimage.gaussian_filter(sub.astype(np.float32), sigma / sp, mode="nearest")
        h = 0.5
        offs = np.concatenate([np.eye(3) * h, -np.eye(3) * h]) + c
        f = ndimage.map_coordinates(sm, (geom.world_to_index(offs) - lo).T, order=1,
                                    mode="nearest")
        grad = (f[:3] - f[3:]) / (2 * h)
        if np.linalg.norm(grad) > 1e-3:
            return -grad / np.linalg.norm(grad)
    return _centroid_normal(labels, geom, c, radius, bone_vals, plate_val)


def _centroid_normal(labels: np.ndarray, geom: Geometry, c: np.ndarray, radius: float,
                     bone_vals: list[int], plate_val: int) -> np.ndarray | None:
    ci = geom.world_to_index(c)[0]
    step = np.maximum(1, np.ceil(2 * radius / np.asarray(geom.spacing) / 48)).astype(int)
    r = np.ceil(radius / np.asarray(geom.spacing)).astype(int) + 1
    lo = np.maximum(np.floor(ci).astype(int) - r, 0)
    hi = np.minimum(np.ceil(ci).astype(int) + r + 1, labels.shape)
    if np.any(hi <= lo):
        return None
    ax = [np.arange(a, b, s) for a, b, s in zip(lo, hi, step)]
    sub = labels[np.ix_(*ax)]
    grid = np.stack(np.meshgrid(*ax, indexing="ij"), -1)
    world = geom.index_to_world(grid.reshape(-1, 3)).reshape(grid.shape)
    ball = ((world - c) ** 2).sum(-1) <= radius ** 2
    bone = ball & np.isin(sub, bone_vals)
    cart = ball & (sub == plate_val)
    if bone.sum() < 3 or cart.sum() < 3:
        return None
    n = world[cart].mean(0) - world[bone].mean(0)
    nn = np.linalg.norm(n)
    return n / nn if nn > 0 else None


def index_crop_getter(idx: np.ndarray) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """Crop function for :func:`sample_columns` from voxel indices (N, 3) of a mask."""
    def crop(sl: tuple[slice, ...]) -> np.ndarray:
        sub = np.zeros(tuple(s.stop - s.start for s in sl), np.float32)
        loc = idx - np.array([s.start for s in sl])
        ok = np.all((loc >= 0) & (loc < sub.shape), axis=1)
        sub[tuple(loc[ok].T)] = 1.0
        return sub
    return crop


def footprint_from_samples(cols: Columns, closing_mm: float) -> np.ndarray:
    """Columns meeting the sampled site mask, closed by a disc and hole-filled."""
    return close_footprint((cols.samples["site"] > 0.5).any(-1) & cols.inside, cols, closing_mm)


def close_footprint(foot: np.ndarray, cols: Columns, closing_mm: float) -> np.ndarray:
    """Binary closing by a disc of radius ``closing_mm`` and hole filling, in the grid."""
    if closing_mm > 0:
        k = int(round(closing_mm / cols.grid_mm))
        yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
        closed = ndimage.binary_closing(np.pad(foot, k + 1), (xx ** 2 + yy ** 2) <= k * k)
        foot |= closed[k + 1:-k - 1, k + 1:-k - 1]
    return ndimage.binary_fill_holes(foot) & cols.inside


def footprint_from_points(cols: Columns, pts_world: np.ndarray, radius_mm: float,
                          closing_mm: float = 0.0) -> np.ndarray:
    """Columns within ``radius_mm`` (tangent plane) of any of the points, closed."""
    rel = np.atleast_2d(pts_world) - cols.frame.center
    pu, pv = rel @ cols.frame.e1, rel @ cols.frame.e2
    d2 = (cols.u[..., None] - pu) ** 2 + (cols.v[..., None] - pv) ** 2
    foot = (d2.min(-1) <= max(radius_mm, cols.grid_mm / math.sqrt(2)) ** 2) & cols.inside
    return close_footprint(foot, cols, closing_mm)


# ----------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class SiteSpec:
    """A site given by LPS points (bone-surface vertices or one centre) and a radius in mm.

    The footprint is every column within ``radius_mm`` (in the tangent plane) of a point.
    ``plate`` (a cartilage plate name) skips the plate search when known; ``info`` (e.g.
    the defect's region, kind, area) is copied into the site's evidence.
    """

    site_id: int
    points_world: np.ndarray
    radius_mm: float
    plate: str | None = None
    source: str = "points"
    info: dict[str, Any] | None = None


def site_inputs(sites: Any, shape: tuple[int, ...]) -> list[tuple[int, Any]]:
    """Normalise the accepted site inputs to (site_id, index array (N,3) | SiteSpec)."""
    if sites is None:
        return []
    if isinstance(sites, np.ndarray):
        if tuple(sites.shape) != tuple(shape):
            raise InputError(f"site array shape {sites.shape} differs from the scan {shape}")
        ids = [int(i) for i in np.unique(sites) if i > 0]
        return [(i, np.argwhere(sites == i)) for i in ids]
    out: list[tuple[int, Any]] = []
    for k, s in enumerate(sites, start=1):
        if isinstance(s, SiteSpec):
            out.append((s.site_id, s))
        else:
            arr = np.asarray(s)
            if tuple(arr.shape) != tuple(shape):
                raise InputError(f"site mask {k} shape {arr.shape} differs from the scan {shape}")
            out.append((k, np.argwhere(arr > 0)))
    return out


def sites_from_scan_result(scan_result: Any) -> list[SiteSpec]:
    """One :class:`SiteSpec` per defect: its bone-surface vertices (``defect_id``), each
    covering a disc of 0.75 x the median vertex spacing."""
    from scipy.spatial import cKDTree

    specs = []
    for d in getattr(scan_result, "defects", []):
        pr = scan_result.plates.get(d.plate)
        if pr is None or len(pr.points_world) < 2:
            continue
        sel = np.asarray(pr.defect_id) == d.id
        if sel.any():
            pts = np.asarray(pr.points_world)
            spacing = float(np.median(cKDTree(pts).query(pts[sel], k=2)[0][:, 1]))
            specs.append(SiteSpec(int(d.id), pts[sel], max(0.75 * spacing, 0.25),
                                  plate=d.plate, source="defect"))
    return specs


def sites_from_defects_csv(path: Path) -> list[SiteSpec]:
    """One :class:`SiteSpec` per row of a ``defects.csv``: a disc of the defect's area."""
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
        return [SiteSpec(int(r["defect_id"]),
                         np.array([[float(r["centroid_x_mm"]), float(r["centroid_y_mm"]),
                                    float(r["centroid_z_mm"])]]),
                         math.sqrt(max(float(r["area_mm2"]), 0.0) / math.pi),
                         plate=r.get("plate") or None, source="defect",
                         info={"region": r.get("region"), "kind": r.get("kind"),
                               "area_mm2": float(r["area_mm2"]),
                               "depth_pct": float(r.get("depth_pct") or "nan")}) for r in rows]
    except (KeyError, ValueError) as exc:
        raise InputError(f"malformed defects table ({exc})", path) from None
